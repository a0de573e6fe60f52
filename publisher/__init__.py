"""publisher: writes versioned, checksummed model snapshots and promotes them (see the pipeline issue)."""
