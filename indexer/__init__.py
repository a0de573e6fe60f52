"""indexer: turns a promoted snapshot plus the live ads into a versioned index in Redis (see the pipeline issue)."""
