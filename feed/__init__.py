"""feed: streams simulated impressions and item events into Kafka at a chosen rate (demo and load tests)."""
