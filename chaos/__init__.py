"""Fault injection for HSNN-Serve: `python -m chaos <experiment>`.

Each experiment injects one family of faults against the real code (and, where it needs them,
real Kafka and Redis from devservers), checks the pass condition of issue 12, and records its
result: one entry per experiment key in reports/reliability.json (merged, so experiments can
run separately) and the table in docs/reliability.md, both rewritten from that JSON.

Fast experiments (also run by the test suite, tests/chaos/):
    e4   snapshot corruption: refused or fallen back, nothing served from a corrupt snapshot
    e5   numeric poison in impressions, item events and requests: rejected at validation
    e7   schemathesis against the live API: 0 5xx, 0 timeouts; 31 of 32 concurrent stay 200 beside a poisoned one
    e10  the runbook rollback, then an expire: the older model is served and the ad is gone
"""
