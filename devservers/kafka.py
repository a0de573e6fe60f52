"""A real single-node Apache Kafka broker (KRaft) as a local child process.

Why not a fake: the services under test depend on broker behaviour that
mocks get wrong (consumer-group rebalances, compaction, topics that must
exist). The jars come from Maven Central via devservers/install.sh, so no
Docker and no tarball download is needed.

One data dir = one cluster. The first start formats storage; later starts
(in this or another process) reuse the data, cluster id and ports, so a
stop()/start() cycle behaves like a broker restart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from devservers._proc import (
    ManagedProcess,
    ServerLifecycle,
    ServerStartError,
    env_path,
    free_port,
    port_accepts,
    port_is_free,
    progress,
)

PACKAGE_DIR = Path(__file__).resolve().parent
LOG4J_CONFIG = PACKAGE_DIR / "log4j2.properties"
INSTALL_MARKER = ".installed"

# A test broker needs fast start-up on small CI boxes, not peak throughput:
# C1-only JIT and the serial GC cut start-up CPU (and threads) on 2 cores.
# Later flags win in HotSpot, so `jvm_args` can override these.
DEFAULT_JVM_OPTS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")

_LISTENERS_RE = re.compile(r"^listeners=PLAINTEXT://127\.0\.0\.1:(\d+),CONTROLLER://127\.0\.0\.1:(\d+)\s*$", re.M)


def devservers_home() -> Path:
    """Install root shared with install.sh: $HSNN_DEVSERVERS_HOME or <repo>/.devservers."""
    return env_path("HSNN_DEVSERVERS_HOME") or PACKAGE_DIR.parent / ".devservers"


def kafka_libs_dir() -> Path:
    """Folder with the broker jars: $HSNN_KAFKA_LIBS or <home>/kafka/libs."""
    return env_path("HSNN_KAFKA_LIBS") or devservers_home() / "kafka" / "libs"


def java_executable() -> str | None:
    """$JAVA_HOME/bin/java if set, else `java` on PATH."""
    java_home = env_path("JAVA_HOME")
    if java_home is not None and (java_home / "bin" / "java").exists():
        return str(java_home / "bin" / "java")
    return shutil.which("java")


class KafkaServer(ServerLifecycle):
    """Single-node Kafka (combined broker+controller) bound to 127.0.0.1.

    Use as a context manager, or call start()/stop() yourself; stop() followed
    by start() restarts on the same ports with the same data.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        libs_dir: str | os.PathLike[str] | None = None,
        broker_port: int | None = None,
        controller_port: int | None = None,
        heap: str = "512m",
        startup_timeout: float = 90.0,
        extra_config: Mapping[str, str | int] | None = None,
        jvm_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.libs_dir = Path(libs_dir).resolve() if libs_dir is not None else kafka_libs_dir()
        self.heap = heap
        self.startup_timeout = startup_timeout
        self.extra_config = {k: str(v) for k, v in (extra_config or {}).items()}
        self.jvm_args = list(jvm_args)
        self.config_path = self.data_dir / "server.properties"
        self.log_dirs = self.data_dir / "kafka-logs"
        self.log_path = self.data_dir / "kafka.log"
        self.broker_port, self.controller_port = self._choose_ports(broker_port, controller_port)
        self._proc: ManagedProcess | None = None
        self._admin: Any = None

    # ------------------------------------------------------------ discovery
    @staticmethod
    def unavailable_reason(libs_dir: str | os.PathLike[str] | None = None) -> str | None:
        """Why a broker cannot be started here, or None if it can (for test skips)."""
        libs = Path(libs_dir) if libs_dir is not None else kafka_libs_dir()
        if not (libs / INSTALL_MARKER).is_file() or not any(libs.glob("kafka_2.13-*.jar")):
            return f"Kafka jars not installed in {libs} (run devservers/install.sh)"
        if java_executable() is None:
            return "no `java` on PATH and JAVA_HOME unset (Kafka 4.x needs Java 17+)"
        return None

    @property
    def bootstrap_servers(self) -> str:
        """Value for kafka-python's `bootstrap_servers`."""
        return f"127.0.0.1:{self.broker_port}"

    # ------------------------------------------------------------- lifecycle
    def start(self) -> KafkaServer:
        """Write config, format storage on first use, launch, wait until ready."""
        if self.running:
            return self
        reason = self.unavailable_reason(self.libs_dir)
        if reason is not None:
            raise ServerStartError(reason)
        for port in (self.broker_port, self.controller_port):
            if not port_is_free(port):
                raise ServerStartError(
                    f"port {port} for Kafka in {self.data_dir} is already in use (another broker on the same data dir?)"
                )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if not (self.log_dirs / "meta.properties").exists():
            self._format_storage()
        progress(f"starting Kafka on {self.bootstrap_servers} (data: {self.data_dir})")
        self._proc = ManagedProcess(
            "Kafka", self._java_cmd("kafka.Kafka", str(self.config_path)), self.log_path, self.data_dir
        )
        self._proc.spawn()
        took = self._proc.wait_ready(
            self._answers_metadata, self.startup_timeout, f"admin client on {self.bootstrap_servers}"
        )
        progress(f"Kafka ready on {self.bootstrap_servers} after {took:.1f}s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown (SIGTERM, controlled log flush); SIGKILL after `timeout`."""
        self._close_admin()
        if self._proc is not None:
            self._proc.stop(timeout=timeout)
            self._proc = None

    # ---------------------------------------------------------------- admin
    def admin(self) -> Any:
        """A cached kafka-python KafkaAdminClient for this broker (closed by stop())."""
        if self._admin is None:
            from kafka.admin import KafkaAdminClient

            self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, client_id="devservers-admin")
        return self._admin

    def create_topics(
        self,
        names: Iterable[str],
        partitions: int = 1,
        compacted: Iterable[str] = frozenset(),
        config: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> list[str]:
        """Create topics (auto-creation is off) and wait until they have leaders.

        Topics named in `compacted` get cleanup.policy=compact; `config` is
        applied to all of them. Existing topics are left alone. Returns the
        names that were actually created.
        """
        from kafka.admin import NewTopic

        wanted = list(dict.fromkeys(names))
        compacted = set(compacted)
        unknown = compacted.difference(wanted)
        if unknown:
            raise ValueError(f"compacted topics not in names: {sorted(unknown)}")
        admin = self.admin()
        existing = set(admin.list_topics())
        new = [name for name in wanted if name not in existing]
        if new:
            topics = []
            for name in new:
                topic_config = dict(config or {})
                if name in compacted:
                    topic_config["cleanup.policy"] = "compact"
                topics.append(
                    NewTopic(name, num_partitions=partitions, replication_factor=1, topic_configs=topic_config)
                )
            admin.create_topics(topics, timeout_ms=int(timeout * 1000))
            self._wait_for_topics(new, timeout)
        return new

    def list_topics(self) -> set[str]:
        """User-visible topic names (internal __consumer_offsets etc. excluded)."""
        return {t for t in self.admin().list_topics() if not t.startswith("__")}

    # -------------------------------------------------------------- helpers
    def _choose_ports(self, broker: int | None, controller: int | None) -> tuple[int, int]:
        """Reuse the ports of an existing data dir: the KRaft voter record stores the
        controller endpoint, so a restarted broker must come back on the same one."""
        previous = self._ports_from_config()
        if previous is not None:
            given = (broker or previous[0], controller or previous[1])
            if given != previous:
                raise ValueError(
                    f"{self.data_dir} was set up with ports {previous}; got {given}. "
                    "Use a fresh data dir to change ports."
                )
            return previous
        broker = broker or free_port()
        controller = controller or free_port(exclude=(broker,))
        if broker == controller:
            raise ValueError("broker_port and controller_port must differ")
        return broker, controller

    def _ports_from_config(self) -> tuple[int, int] | None:
        try:
            match = _LISTENERS_RE.search(self.config_path.read_text())
        except OSError:
            return None
        return (int(match.group(1)), int(match.group(2))) if match else None

    def _properties(self) -> dict[str, str]:
        controller = f"127.0.0.1:{self.controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Kafka 4.x dynamic quorum: with `format --standalone` the voter
            # set lives in the metadata log; this is only how to reach it.
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{self.bootstrap_servers},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap_servers}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Tests join consumer groups constantly; the default 3 s delay
            # would be paid on every first join.
            "group.initial.rebalance.delay.ms": "0",
            # Services must create their topics explicitly, as in production.
            "auto.create.topics.enable": "false",
            "log.retention.hours": "-1",
            "log.cleaner.backoff.ms": "1000",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
        }
        props.update(self.extra_config)
        return props

    def _write_config(self) -> None:
        lines = ["# Written by devservers.kafka.KafkaServer; rewritten on every start."]
        lines += [f"{key}={value}" for key, value in self._properties().items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _java_cmd(self, main_class: str, *args: str) -> list[str]:
        java = java_executable() or "java"
        logging = [f"-Dlog4j2.configurationFile={LOG4J_CONFIG}"] if LOG4J_CONFIG.is_file() else []
        return [
            java,
            "-Xms128m",
            f"-Xmx{self.heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            *DEFAULT_JVM_OPTS,
            *logging,
            *self.jvm_args,
            "-cp",
            str(self.libs_dir / "*"),
            main_class,
            *args,
        ]

    def _run_tool(self, *args: str) -> str:
        cmd = self._java_cmd("kafka.tools.StorageTool", *args)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise ServerStartError(
                f"`kafka.tools.StorageTool {' '.join(args)}` failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def _format_storage(self) -> None:
        """One-time KRaft storage format with a fresh cluster id (standalone quorum)."""
        progress(f"formatting Kafka storage in {self.log_dirs}")
        cluster_id = self._run_tool("random-uuid").strip().splitlines()[-1].strip()
        self._run_tool("format", "--standalone", "-t", cluster_id, "-c", str(self.config_path))

    def _answers_metadata(self) -> bool:
        """Ready = the broker serves a metadata request to a real admin client."""
        if not port_accepts(self.broker_port):
            return False
        from kafka.admin import KafkaAdminClient

        client = KafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers, client_id="devservers-probe", request_timeout_ms=5000
        )
        try:
            client.list_topics()
        finally:
            client.close()
        return True

    def _wait_for_topics(self, names: list[str], timeout: float) -> None:
        admin = self.admin()
        if hasattr(admin, "wait_for_topics"):  # kafka-python >= 3
            admin.wait_for_topics(names, timeout_ms=int(timeout * 1000))
            return
        deadline = time.monotonic() + timeout
        while not set(names) <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {names} did not appear within {timeout:.0f}s")
            time.sleep(0.2)

    def _close_admin(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            finally:
                self._admin = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"KafkaServer({self.bootstrap_servers}, {state}, data_dir={str(self.data_dir)!r})"
