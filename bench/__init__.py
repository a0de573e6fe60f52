"""Offline benchmark harness: data loaders, baselines, reports."""
