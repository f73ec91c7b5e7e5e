"""Watching the live model: drift of what it is sent against the data it was trained on (``fluxo monitor``)."""
