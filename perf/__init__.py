"""tritonbn's performance report: shape suites, timing harness, CSV, plots.

Run it with ``perf/run_report.sh`` (or ``python -m perf.report``); ``perf/gpu_run.sh`` is
the one script for a lent GPU machine. ``perf/notes.md`` explains the method and targets.
"""
