"""Self-contained HTML pages (drift reports, model reports): plots inlined as PNG data URIs.

One file that opens anywhere: in MLflow's artifact viewer, from a served ``GET /report``,
or from disk, with no scripts, no CDN and nothing fetched.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d232a;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0} td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:right}
th{background:#f3f5f7} td.l,th.l{text-align:left} .muted{color:#57606a} .bad{color:#b42318;font-weight:600}
.good{color:#067647;font-weight:600} figure{display:inline-block;margin:.5rem 1rem .5rem 0} img{max-width:100%}
figcaption{font-size:.85rem;color:#57606a}
"""


def figure_uri(figure: Any) -> str:
    """A matplotlib figure as a ``data:image/png`` URI; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def new_figure(width: float = 5.0, height: float = 3.5) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def esc(value: object) -> str:
    return html.escape(str(value))


def image(uri: str, caption: str, alt: str | None = None) -> str:
    return f'<figure><img src="{uri}" alt="{esc(alt or caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def table(header: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned (names), the rest right-aligned (numbers)."""
    def cell(tag: str, i: int, value: object) -> str:
        css = ' class="l"' if i < left else ""
        text = value if isinstance(value, Markup) else esc(value)
        return f"<{tag}{css}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Markup(str):
    """Already-escaped HTML for a table cell."""


def page(title: str, subtitle: str, sections: Iterable[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{esc(name)}</h2>{content}" for name, content in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{esc(title)}</h1><p class="muted">{esc(subtitle)}</p>{body}</body></html>')
