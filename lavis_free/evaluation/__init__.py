"""Early-exit evaluation commands (each runs as `python -m lavis_free.evaluation.<name>`):
`sweep` (thresholds x KV policies against full depth), `calibrate` (threshold within a quality
tolerance, reported on a test split, with the oracle exit ceiling), `report` (one report.md +
report.json), `plots`. `runs` and `oracle` hold what they share; `outputs` checks the output
directory first and writes every result file atomically."""
