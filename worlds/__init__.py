"""Simulated worlds with a known truth: the planted problem (`planted`) and the ad marketplace (`simulator`).

Tests, the benchmark, the feed and the demo read them; no service (trainer, indexer, retrieval_api,
publisher) imports them.
"""
