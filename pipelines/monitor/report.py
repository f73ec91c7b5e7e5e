"""The drift report: one HTML page per ``fluxo monitor`` run, logged to MLflow beside its metrics.

The verdict and what was compared, then each signal's own section (pipelines/monitor/signals/).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.monitor.signals import Finding
from pipelines.reporting import esc, page, table

_COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _signals(count: int) -> str:
    """``three signals``: the count in words, as the subtitle has always said it."""
    word = _COUNTS[count] if count < len(_COUNTS) else str(count)
    return f"{word} signal" + ("" if count == 1 else "s")


def drift_report(summary: dict, findings: Mapping[str, Finding], labels: list[str]) -> str:
    """``findings``: pipelines.monitor.detect.compare's; ``labels``: the model's class names."""
    verdict = "drift detected" if summary["drift_detected"] else "no drift detected"
    css = "bad" if summary["drift_detected"] else "good"
    tests = [finding.test for finding in findings.values()]
    rows = [(t.signal, f"{t.statistic:.5f}", f"{t.p_value:.3g}", f"{t.level:.3g}", "yes" if t.drift else "no")
            for t in tests]
    if summary.get("drifted_columns"):
        verdict += f" in columns {', '.join(summary['drifted_columns'])}"
    window = summary["window"]
    facts = table(["", ""], [
        ("model", f"{summary['model']} v{summary['model_version']}"),
        ("data version (reference)", summary["data_version"]),
        ("reference", f"{summary['reference_size']} validation samples"),
        ("window", f"{window['start']} .. {window['end']}"),
        ("instances / requests", f"{window['instances']} / {window['requests']}"),
    ])
    sections = [
        ("Verdict", f'<p class="{css}">{esc(verdict)}</p>' + table(
            ["signal", "statistic", "p-value", "level", "drift"], rows)),
        ("What was compared", facts),
    ]
    for finding in findings.values():
        section = finding.signal.section(finding, labels)
        if section is not None:
            sections.append(section)
    tests = "hyppo MMD (chi-square null)"
    if "drifted_columns" in summary:
        tests += ", a table's columns one by one (KS, Fisher, chi-squared)"
    return page(f"Drift report: {summary['model']} v{summary['model_version']}",
                f"{tests}, alpha {summary['alpha']} split over {_signals(len(findings))}", sections)
