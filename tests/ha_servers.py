"""Clusters of the tests' own on loopback, for the high-availability tests (tests/test_ha.py):
a PostgreSQL primary with a synchronous hot standby, and a three-node NATS cluster with
JetStream.

PostgreSQL comes from pgserver's bundled binaries. PostgreSQL refuses to run as root, so as root
every server command runs as pgserver's unprivileged system user ``pgserver``, as pgserver
itself does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

import nats
import nats.errors
import nats.js.errors
import psycopg2
from pgserver._commands import POSTGRES_BIN_PATH
from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

from bridge.embedded_nats import server_binary
from bridge.jetstream import stream_config
from tests.harness import end_process, free_port

SYSTEM_USER: Final = "pgserver"

T = TypeVar("T")


def _system_user() -> str | None:
    """The user PostgreSQL runs as: pgserver's own when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    ensure_user_exists(SYSTEM_USER)
    return SYSTEM_USER


def _private_root(prefix: str, user: str | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if user is not None:
        ensure_prefix_permissions(root)
        root.chmod(0o755)
        shutil.chown(root, user, user)
    return root


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a primary and a hot standby


class PostgresNode:
    """One PostgreSQL server on 127.0.0.1 with a data directory of its own."""

    def __init__(self, root: Path, name: str, user: str | None) -> None:
        self.name = name
        self.data = root / name
        self.port = free_port()
        self.user = user
        self.log = root / f"{name}.log"

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def initdb(self) -> None:
        """A new primary: trust on loopback (the default pg_hba.conf of initdb allows local
        replication connections too), WAL for a standby."""
        self._run(
            "initdb",
            ["-D", str(self.data), "--auth=trust", "--encoding=utf8", "-U", "postgres"],
        )
        self._configure(
            "wal_level = replica",
            "max_wal_senders = 8",
            "max_replication_slots = 8",
            "wal_keep_size = '256MB'",
            "hot_standby = on",
            "synchronous_commit = on",
        )

    def base_backup_of(self, primary: PostgresNode) -> None:
        """This node as a hot standby of ``primary``: ``pg_basebackup -R`` (which writes the
        standby.signal and primary_conninfo), on a port of its own."""
        shutil.rmtree(self.data, ignore_errors=True)
        self._run(
            "pg_basebackup",
            [
                "-D",
                str(self.data),
                "-R",
                "-X",
                "stream",
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                # The standby's name in pg_stat_replication and synchronous_standby_names.
                "-d",
                f"application_name={self.name}",
            ],
        )
        # The primary's postgresql.auto.conf comes along: its synchronous_standby_names would
        # make this node, once promoted with no standby of its own, wait on every commit.
        self._forget_synchronous_standbys()

    def _forget_synchronous_standbys(self) -> None:
        auto = self.data / "postgresql.auto.conf"
        lines = [
            line
            for line in auto.read_text().splitlines()
            if not line.startswith("synchronous_standby_names")
        ]
        auto.write_text("\n".join(lines) + "\n")

    def _configure(self, *lines: str) -> None:
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self) -> None:
        self._pg_ctl(
            [
                "-w",
                "-t",
                "60",
                "-l",
                str(self.log),
                # The port and address on the command line, so a base backup's copy of the
                # primary's postgresql.conf does not decide them.
                "-o",
                f"-p {self.port} -h 127.0.0.1 -k ''",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        """``-m immediate``: the postmaster and every backend end at once, as in a crash."""
        self._pg_ctl(["-w", "-m", mode, "stop"])

    def promote(self) -> None:
        """End recovery: the standby becomes a primary (``pg_ctl promote -w``)."""
        self._pg_ctl(["-w", "-t", "60", "promote"])

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def query(self, text: str, database: str = "postgres") -> list[tuple[object, ...]]:
        conn = psycopg2.connect(self.admin_url(database), connect_timeout=3)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(text)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def in_recovery(self) -> bool:
        ((value,),) = self.query("SELECT pg_is_in_recovery()")
        return bool(value)

    def _pg_ctl(self, args: list[str]) -> None:
        self._run("pg_ctl", ["-D", str(self.data), *args])

    def _run(self, program: str, args: list[str]) -> None:
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            capture_output=True,
            timeout=120,
            user=self.user,
            cwd="/",
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(
                f"{program} {' '.join(args)} failed ({result.returncode}):"
                f" {result.stderr.decode(errors='replace')}\n{log}"
            )


class PostgresPair:
    """A primary and a hot standby with synchronous replication: a commit is confirmed only
    once the standby has flushed it, so a promoted standby holds every confirmed commit.

    The two nodes swap roles at each failover: :meth:`fail_over` stops the primary hard and
    promotes the standby; :meth:`rebuild_standby` makes the old primary a standby again.
    """

    def __init__(self) -> None:
        self.user = _system_user()
        self.root = _private_root("orders-ha-pg-", self.user)
        self.primary = PostgresNode(self.root, "a", self.user)
        self.standby = PostgresNode(self.root, "b", self.user)
        self.primary.initdb()
        self.primary.start()
        self.standby.base_backup_of(self.primary)
        self.standby.start()
        self._make_synchronous()

    @property
    def nodes(self) -> tuple[PostgresNode, PostgresNode]:
        """Both nodes in a fixed order (not by role), as a connection string lists them."""
        return tuple(sorted((self.primary, self.standby), key=lambda node: node.name))  # type: ignore[return-value]

    def url(self, database: str, target_session_attrs: str) -> str:
        """libpq's multi-host URL naming both nodes."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        query = f"target_session_attrs={target_session_attrs}"
        return f"postgresql://postgres@{hosts}/{database}?{query}"

    def create_database(self, name: str) -> None:
        self.primary.query(f'CREATE DATABASE "{name}"')

    def _make_synchronous(self, timeout: float = 60.0) -> None:
        self.primary.query(f"ALTER SYSTEM SET synchronous_standby_names = '{self.standby.name}'")
        self.primary.query("SELECT pg_reload_conf()")
        deadline = time.monotonic() + timeout
        while True:
            rows = self.primary.query(
                "SELECT sync_state FROM pg_stat_replication"
                f" WHERE application_name = '{self.standby.name}'"
            )
            if rows and rows[0][0] == "sync":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the standby is not synchronous: {rows}")
            time.sleep(0.1)

    def fail_over(self) -> None:
        """The primary stops as in a crash; the standby is promoted (what an operator, or
        Patroni, does when the primary is lost)."""
        self.primary.stop("immediate")
        self.promote()

    def promote(self) -> None:
        self.standby.promote()
        self.primary, self.standby = self.standby, self.primary

    def rebuild_standby(self) -> None:
        """The old primary, lost, comes back as a standby of the new one, from a base backup
        (its own WAL may hold commits the new primary never had)."""
        self.standby.base_backup_of(self.primary)
        self.standby.start()
        self._make_synchronous()

    def close(self) -> None:
        for node in (self.primary, self.standby):
            if node.running():
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    node.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_pair() -> Iterator[PostgresPair]:
    pair = PostgresPair()
    try:
        yield pair
    finally:
        pair.close()


# ---------------------------------------------------------------------------------------------
# NATS: three nodes


class NatsNode:
    """One nats-server of a cluster, with JetStream, on 127.0.0.1."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.cluster_port = free_port()
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.config = self.dir / "nats-server.conf"
        self.log = self.dir / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def configure(self, cluster: str, peers: Sequence[NatsNode], ping_interval_s: int) -> None:
        routes = ", ".join(f'"nats://127.0.0.1:{peer.cluster_port}"' for peer in peers)
        self.config.write_text(
            f'server_name: "{self.name}"\n'
            f'listen: "127.0.0.1:{self.port}"\n'
            # A stopped peer is noticed after ping_interval * ping_max.
            f'ping_interval: "{ping_interval_s}s"\n'
            "ping_max: 2\n"
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n'
            f'cluster {{ name: "{cluster}", listen: "127.0.0.1:{self.cluster_port}",'
            f" routes: [{routes}] }}\n"
        )

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(server_binary()), "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: the node is gone at once, its connections with it."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the node's sockets stay open, and nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGCONT)
        end_process(process)


class NatsCluster:
    """Three nats-server nodes routed to each other, JetStream on each."""

    def __init__(self, size: int = 3, ping_interval_s: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="orders-ha-nats-"))
        self.nodes = [NatsNode(self.root, f"n{index + 1}") for index in range(size)]
        name = f"orders-{self.root.name[-6:]}"
        for node in self.nodes:
            node.configure(name, [peer for peer in self.nodes if peer is not node], ping_interval_s)

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def node(self, name: str) -> NatsNode:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def node_at(self, port: int) -> NatsNode:
        (found,) = [node for node in self.nodes if node.port == port]
        return found

    def seed_list(self, first: NatsNode | None = None) -> str:
        """ORDERS_NATS_URL's seed list, ``first`` at its head (the service tries them in order)."""
        ordered = sorted(self.nodes, key=lambda node: node is not first)
        return ",".join(node.url for node in ordered)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until JetStream answers on every node (the cluster has elected its meta leader)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while True:
                try:
                    nc = await nats.connect(node.url, connect_timeout=1, max_reconnect_attempts=0)
                    try:
                        await nc.jetstream().account_info()
                    finally:
                        await nc.close()
                    break
                except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{node.name}: JetStream not ready: {exc}") from exc
                    await asyncio.sleep(0.2)

    async def create_stream(
        self, via: NatsNode, name: str, subjects: list[str], replicas: int = 3
    ) -> str:
        """The stream as an operator would create it for a cluster: replicated ``replicas``
        times, otherwise the service's own definition. Returns the leader's name."""
        nc = await nats.connect(via.url, connect_timeout=2)
        try:
            js = nc.jetstream()
            await retrying(lambda: js.add_stream(stream_config(name, subjects, replicas)))
            deadline = time.monotonic() + 30
            while True:
                info = await retrying(lambda: js.stream_info(name))
                cluster = info.cluster
                peers = (cluster.replicas or []) if cluster is not None else []
                caught_up = len(peers) == replicas - 1 and all(peer.current for peer in peers)
                if cluster is not None and cluster.leader and caught_up:
                    return cluster.leader
                if time.monotonic() > deadline:
                    raise AssertionError(f"stream {name} not replicated: {cluster}")
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


async def retrying(call: Callable[[], Awaitable[T]], seconds: float = 60.0) -> T:
    """``call()`` until JetStream answers it: after a node is lost or let go, the cluster
    answers 503 (no leader yet) for a few seconds."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except (nats.errors.Error, nats.js.errors.Error, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def connected_port(log: str) -> int:
    """The port of the NATS server the worker's log last says it is connected to."""
    ports = re.findall(r"connected to NATS at nats://127\.0\.0\.1:(\d+)", log)
    assert ports, f"the worker never said which NATS server it uses:\n{log[-3000:]}"
    return int(ports[-1])


@contextlib.contextmanager
def nats_cluster() -> Iterator[NatsCluster]:
    cluster = NatsCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()
