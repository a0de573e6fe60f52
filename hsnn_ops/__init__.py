"""`hsnn-ops`: inspect and steer a running HSNN-Serve deployment (snapshots, the Redis index, health)."""
