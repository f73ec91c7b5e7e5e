"""``python -m pipelines.cli``: the ``fluxo`` command (torchrun relaunches training this way)."""

from pipelines.cli import app

app()
