"""Renderers: JSON documents, rich terminal tables and the plotly HTML report. They only read results.

- jsonout.py: `estimate --json` (and the run header both engines share); terminal.py: its tables.
- trace_json.py, trace_terminal.py: `estimate --engine trace|both` (an EngineRun, trace/run.py).
- plan_json.py, plan_terminal.py: `plan`.
- profile_terminal.py: `profile`'s summary (the profile JSON itself is profiler/results.py's schema).
- catalogue.py: `models`, `gpus`, `methods`.
- html.py: the self-contained HTML pages of `plan --html` and `report`.
"""
