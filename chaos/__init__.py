"""Fault-injection experiments against real Kafka and Redis (devservers): `python -m chaos <experiment>`.

Each experiment is a module with `main(argv) -> int` registered in `chaos.__main__.EXPERIMENTS`; it
writes its result under its key to reports/reliability.json and a row to docs/reliability.md
(`chaos.report.record`).
"""
