"""Where the indexer's catalogue stands in the items topic, kept in Redis beside the catalogue itself.

Redis holds the catalogue *and* how far into the items topic it has read, so the two cannot disagree:
after a FLUSHALL or a restart without persistence the offsets are gone with the catalogue and the
indexer replays the topic; a replay under way is marked by a token that a FLUSHALL also removes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import redis as redis_lib
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from indexer.metrics import IndexerMetrics
from streaming.index_store import IndexKeys

log = logging.getLogger("hsnn.indexer")


def catalogue_offsets_key(prefix: str) -> str:
    """Redis hash `topic:partition` -> next offset of the items topic the catalogue reflects."""
    return f"{IndexKeys(prefix).catalog}:offsets"


def read_catalogue_offsets(redis: redis_lib.Redis, topic: str, prefix: str) -> dict[int, int] | None:
    """Where the catalogue stands in `topic`; None when Redis has no record (lost, flushed or never read)."""
    stored = redis.hgetall(catalogue_offsets_key(prefix))
    if not stored:
        return None
    out = {}
    for field, value in stored.items():
        name, _, partition = (field.decode() if isinstance(field, bytes) else field).rpartition(":")
        if name == topic:
            out[int(partition)] = int(value)
    return out


def write_catalogue_offsets(redis: redis_lib.Redis, topic: str, offsets: dict[int, int], prefix: str) -> None:
    """Declare the catalogue complete up to `offsets` (also used by tools that load a catalogue directly)."""
    redis.hset(
        catalogue_offsets_key(prefix),
        mapping={"written_at": repr(time.time()), **{f"{topic}:{p}": o for p, o in offsets.items()}},
    )


def catalogue_replay_key(prefix: str) -> str:
    """Redis string: the token of the replay under way (gone with a FLUSHALL, which then voids that replay)."""
    return f"{IndexKeys(prefix).catalog}:replay"


# KEYS: offsets hash, replay token key. ARGV: token ("" = advancing a complete catalogue), field/value pairs.
# Writes only if the catalogue is still the one this indexer has been filling: the offsets hash still exists
# (advancing), or the replay's token is still there (completing a replay). A FLUSHALL between the poll and
# this write would otherwise leave a fresh marker over a nearly empty catalogue.
_ADVANCE_OFFSETS = """
if ARGV[1] == '' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
else
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


def advance_catalogue_offsets(
    redis: redis_lib.Redis, prefix: str, topic: str, positions: dict[int, int], replay_token: str
) -> bool:
    """Write `positions` as the catalogue's offsets unless Redis lost the catalogue meanwhile (see the script).

    `replay_token`: "" when advancing a complete catalogue, else the token of the replay this completes.
    """
    fields: list[object] = ["written_at", repr(time.time())]
    for partition, offset in positions.items():
        fields += [f"{topic}:{partition}", offset]
    return bool(
        redis.eval(
            _ADVANCE_OFFSETS, 2, catalogue_offsets_key(prefix), catalogue_replay_key(prefix), replay_token, *fields
        )
    )


class CatalogueCursor:
    """The items consumer's position, kept in step with where Redis says the catalogue stands.

    Before each poll `sync` seeks the consumer to the catalogue's offsets (or starts a replay from the
    beginning when Redis lost them); after a batch `checkpoint` writes the new positions to Redis, once
    the batch's dead letters are acknowledged and any replay has reached the end it aimed for.
    """

    def __init__(self, redis: redis_lib.Redis, prefix: str, topic: str, metrics: IndexerMetrics):
        self.redis = redis
        self.prefix = prefix
        self.topic = topic
        self.metrics = metrics
        self.partitions: list[TopicPartition] = []
        self.offsets: dict[int, int] | None = None  # what Redis held (or we wrote) last: catalogue position
        self.replay_target: dict[int, int] | None = None  # end offsets a running replay must reach
        self.replay_token = ""  # marks the running replay in Redis
        self.rewind = False  # a failed batch: seek back to the catalogue's offsets before the next poll

    def attach(self, partitions: list[TopicPartition]) -> None:
        """A new consumer with these partitions assigned: position it before its first poll."""
        self.partitions = partitions
        self.offsets = None
        self.rewind = True

    def complete(self) -> bool:
        """Redis records how far the catalogue has read the items topic, and no replay is running."""
        return self.replay_target is None and bool(self.redis.exists(catalogue_offsets_key(self.prefix)))

    def sync(self, consumer: KafkaConsumer) -> None:
        """Position the consumer where Redis says the catalogue stands; replay from the start if Redis lost it."""
        stored = read_catalogue_offsets(self.redis, self.topic, self.prefix)
        if stored is None:
            if self.replay_target is None or self.rewind:
                self._start_replay(consumer, "start" if self.offsets is None else "lost")
            return
        if stored == self.offsets and not self.rewind:
            return
        if self.offsets is not None and any(stored.get(p, 0) < o for p, o in self.offsets.items()):
            log.warning("Redis catalogue offsets %s older than written %s: replaying the gap", stored, self.offsets)
            self.metrics.catalogue_replays.labels(reason="rolled_back").inc()
        for tp in self.partitions:
            if tp.partition in stored:
                consumer.seek(tp, stored[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        self.offsets = stored
        self.replay_target = None
        self.rewind = False
        self.metrics.replaying.set(0)

    def _start_replay(self, consumer: KafkaConsumer, cause: str) -> None:
        if cause == "lost":
            log.error("Redis has no catalogue offsets any more (FLUSHALL or restart without data): replaying")
        consumer.seek_to_beginning(*self.partitions)
        end = consumer.end_offsets(self.partitions, timeout_ms=15_000)
        self.replay_token = uuid.uuid4().hex
        self.redis.set(catalogue_replay_key(self.prefix), self.replay_token)
        self.replay_target = {tp.partition: end[tp] for tp in self.partitions}
        self.offsets = None
        self.rewind = False
        self.metrics.catalogue_replays.labels(reason=cause).inc()
        self.metrics.replaying.set(1)
        log.info("replaying %s up to %s before any rebuild", self.topic, self.replay_target)

    def checkpoint(self, consumer: KafkaConsumer, dead_letters_acknowledged: Callable[[], bool]) -> None:
        """Record the consumer's position in Redis (and the group) once every dead letter is acknowledged."""
        positions = {tp.partition: consumer.position(tp) for tp in self.partitions}
        if self.replay_target is None and positions == self.offsets:
            return
        if not dead_letters_acknowledged():
            return
        replaying = self.replay_target is not None
        if self.replay_target is not None and any(positions[p] < end for p, end in self.replay_target.items()):
            return
        written = advance_catalogue_offsets(
            self.redis, self.prefix, self.topic, positions, self.replay_token if replaying else ""
        )
        if not written:  # Redis lost the catalogue after this poll began: what was applied sits on nothing
            log.error("Redis lost the catalogue during the last batch (FLUSHALL or restart): replaying")
            self.replay_target = None
            self.rewind = True
            return
        if replaying:
            log.info("catalogue replay complete at %s", positions)
            self.replay_target = None
            self.metrics.replaying.set(0)
        self.offsets = positions
        try:
            consumer.commit({tp: OffsetAndMetadata(positions[tp.partition], "", -1) for tp in self.partitions})
        except KafkaError as err:  # lag dashboards only: Redis holds the position that matters
            log.warning("offset commit failed (lag metrics only): %s", err)
