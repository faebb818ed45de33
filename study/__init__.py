"""Orchestration above the stages: a study kind's graph of stage specs, run with keys, sweeps and one report.

Run it as ``python -m study`` (see study/__main__.py).
"""
