"""The one-command demo of the whole streaming system: `python -m demo` (or `./scripts/demo.sh`).

It starts a real Kafka broker and a real Redis server (devservers), the trainer, the indexer and the
retrieval API as child processes, streams simulated marketplace traffic into Kafka, and prints live
progress: events produced and trained, snapshots published, the index in Redis, what the API serves and
how fresh it is, how long a new ad takes to become retrievable, and the recall of the API's answers
against the simulator's true top-K. Ctrl-C (or SIGTERM) stops everything in order and prints a summary.

The quick, core-only demo (train, index and serve on the planted problem, no services) stays
`python -m demo.model_only`.
"""
