"""A/B experiments on live calls (issue 15): `[[experiments]]` in config.toml.

- `assignment.py`: a caller's variant (hash of experiment and number, weighted);
- `variants.py`: each variant's pipeline deps, built once at start;
- `runner.py`: assignment, recording and the guard rails on live calls;
- `outcomes.py`: what each variant's calls did, read from the history;
- `stats.py`, `compare.py`, `guard.py`: intervals, tests, verdicts, breaches;
- `report.py`: `switchboard experiments` (table, JSON, CSV).
"""
