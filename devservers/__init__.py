"""Real Kafka and Redis servers as local processes, for integration tests and demos.

Install once with ``devservers/install.sh``; then::

    from devservers import KafkaServer, RedisServer

    with KafkaServer(tmp / "kafka") as kafka, RedisServer(tmp / "redis") as redis:
        kafka.create_topics(["events"], partitions=3, compacted={"..."})
        ...  # use kafka.bootstrap_servers and redis.url

Or from a shell: ``python -m devservers up --data-dir /tmp/hsnn-dev``.
"""

from devservers._proc import ServerStartError
from devservers.kafka import KafkaServer
from devservers.redis import RedisServer

__all__ = ["KafkaServer", "RedisServer", "ServerStartError"]
