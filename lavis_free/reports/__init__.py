"""Reports written by commands (JSON + PNG): `python -m lavis_free.reports.exit_quality ...`."""
