"""The streaming layer the services share, built on the model package `hsnn` (one way: hsnn never imports it).

Contracts: Kafka event models and their tensor conversion (`events`), the snapshot store (`snapshots`),
the Redis index layout (`index_store`), the tiny model preset (`presets`). Plumbing: settings
(`settings`), Kafka offsets and clients (`offsets`, `kafka_clients`), the dead-letter outbox
(`dead_letters`), metrics and liveness (`service_metrics`, `health`), the package version (`version`).
"""
