"""The per-version HTML report: served evaluation, calibration, latency and the champion, written at export."""
