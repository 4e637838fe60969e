"""High availability on the distributed engines, with clusters the tests start themselves on
loopback (tests/ha_servers.py): a PostgreSQL primary with a synchronous hot standby that is
promoted when the primary is lost, and a three-node NATS cluster with an R3 stream that loses
a node. Each run ends with the full audit (tests/chaos_servers.py ``audit``): every published
valid order once in the log, the views equal to the log, the workers never restarted.

Bounded sizes (one fault each) inside ``make test``; ``make chaos`` (``ORDERS_CHAOS=full``)
runs ten rounds of each. The figures are printed as ``[chaos] test: key=value ...`` lines.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import nats
import pytest

from bridge.jetstream import ensure_consumer
from streams.config import Settings
from streams.store import StoreUnavailable
from tests.chaos_servers import (
    ConsumerState,
    Figures,
    Published,
    audit,
    chaos,
    chaos_messages,
    consumer_state,
    orders_served,
    publish_steadily,
    sized,
    wait_settled,
)
from tests.database import InspectedStore
from tests.flow import logged
from tests.ha_servers import (
    NatsCluster,
    NatsNode,
    PostgresPair,
    connected_port,
    nats_cluster,
    postgres_pair,
    retrying,
)
from tests.harness import Route
from tests.test_integrity import _run_on_uvloop, accepted
from tests.worker import Worker, eventually

pytestmark = chaos

# As in test_chaos.py: what a killed connection held comes back within the run.
ACK_WAIT_S: Final = "5"
ROUNDS: Final = sized(1, 10)


async def _served_more_than(worker: Worker, floor: int, timeout: float = 120.0) -> None:
    async def more() -> bool:
        worker.check_alive()
        return await orders_served(worker) > floor

    await eventually(more, f"more than {floor} orders served", timeout, worker.log_tail)


def _pid(worker: Worker) -> int:
    assert worker.process is not None
    return worker.process.pid


# ---------------------------------------------------------------------------------------------
# 1-2. PostgreSQL: the primary lost, the standby promoted


@pytest.fixture
def pg_pair() -> Iterator[PostgresPair]:
    with postgres_pair() as pair:
        yield pair


def _head(pair: PostgresPair, database: str, *, on_primary: bool) -> int:
    node = pair.primary if on_primary else pair.standby
    ((head,),) = node.query("SELECT coalesce(max(seq), 0) FROM orders_events", database)
    return int(str(head))


def test_a_store_on_uvloop_reaches_the_promoted_standby(pg_pair: PostgresPair) -> None:
    """Promise 1 across a failover, under uvloop (the worker's loop): while the old primary
    refused connections, each refused connect left a closed uvloop poller behind for its file
    descriptor, and the next connection given that descriptor (the one to the new primary)
    failed with ``RuntimeError: unable to perform operation on <UVPoll closed=True>`` until
    the garbage collector happened to finalise the failed connection: a writer stalled on a
    reachable primary, and its batches were reported as failures with a traceback each.
    Every failure on the way must be StoreUnavailable, and the store reach the new primary."""
    name = f"ha_{uuid.uuid4().hex[:10]}"
    pg_pair.create_database(name)
    unexpected: list[BaseException] = []

    async def write(store: InspectedStore) -> bool:
        try:
            await store.write_batch([accepted()], [])
        except StoreUnavailable:
            return False
        except Exception as exc:
            unexpected.append(exc)
            return False
        return True

    async def work() -> None:
        store = await InspectedStore.open(pg_pair.url(name, "read-write"))
        try:
            assert await write(store)
            pg_pair.primary.stop("immediate")
            for _ in range(5):  # refused: no host is writable yet
                assert not await write(store)
                await asyncio.sleep(0.1)
            pg_pair.promote()
            for _ in range(1200):
                if await write(store):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("never written on the new primary")
        finally:
            await store.close()

    _run_on_uvloop(work)
    assert unexpected == []
    ((count,),) = pg_pair.primary.query("SELECT count(*) FROM orders_events", name)
    assert count == 2


async def test_writer_and_replica_follow_a_promoted_standby(
    tmp_path: Path, pg_pair: PostgresPair, nats_url: str, figures: Figures
) -> None:
    """Promises 1 and 3 across a failover: mid-burst, the primary stops as in a crash
    (``pg_ctl stop -m immediate``) and its synchronous standby is promoted. The writer, given
    both hosts with ``target_session_attrs=read-write``, commits on the new primary without a
    restart; nothing confirmed on the old primary is missing (synchronous replication), and
    nothing is stored twice. A read replica on the standby (``prefer-standby``) follows the log
    by polling (a hot standby refuses LISTEN), and the new primary after the promotion."""
    name = f"ha_{uuid.uuid4().hex[:10]}"
    pg_pair.create_database(name)
    route = Route(nats_url)
    writer = Worker(
        tmp_path / "writer",
        **route.env(pg_pair.url(name, "read-write")),
        ORDERS_NATS_ACK_WAIT_S=ACK_WAIT_S,
    )
    reader = Worker(
        tmp_path / "reader",
        **route.env(pg_pair.url(name, "prefer-standby")),
        ORDERS_CONSUME="false",
        ORDERS_FOLLOW_POLL_S="0.5",
    )
    rate = 300.0
    published = Published()
    first_commits: list[float] = []
    promotions: list[float] = []
    with writer:
        await writer.wait_ready()  # the schema is in place before the replica starts
        with reader:
            await reader.wait_ready()
            pids = _pid(writer), _pid(reader)
            for round_ in range(ROUNDS):
                messages = chaos_messages(int(rate * 6), seed=700 + round_)
                publishing = asyncio.create_task(publish_steadily(route, messages, rate=rate))
                await _served_more_than(writer, len(published.valid) + 300)
                stopped = time.monotonic()
                await asyncio.to_thread(pg_pair.primary.stop, "immediate")
                # Every commit the writer saw confirmed is on the standby already.
                head = await asyncio.to_thread(_head, pg_pair, name, on_primary=False)
                await asyncio.to_thread(pg_pair.promote)
                promotions.append(time.monotonic() - stopped)

                async def committed_on_new_primary(head: int = head) -> bool:
                    writer.check_alive()
                    return await asyncio.to_thread(_head, pg_pair, name, on_primary=True) > head

                await eventually(
                    committed_on_new_primary, "a commit on the new primary", 120, writer.log_tail
                )
                first_commits.append(time.monotonic() - stopped)
                published.extend(await publishing)
                if round_ + 1 < ROUNDS:
                    await asyncio.to_thread(pg_pair.rebuild_standby)
            store = await InspectedStore.open(pg_pair.primary.admin_url(name))
            try:
                state = await wait_settled(store, route, published, [writer, reader])
                report = await audit(store, published, [writer, reader])
            finally:
                await store.close()
            # Then on LISTEN, which the standby refused: it tries again every few seconds.
            await eventually(
                logged(reader, "following orders_events: LISTEN"),
                "the replica listens on the promoted standby",
                60,
                reader.log_tail,
            )
            assert (_pid(writer), _pid(reader)) == pids, "no worker was restarted"
            reader_log = reader.log()
    polling = [line for line in reader_log.splitlines() if "LISTEN not possible" in line]
    assert polling, f"the replica never said it follows by polling:\n{reader_log[-3000:]}"
    assert all("INFO" in line for line in polling), polling
    figures.record(
        rounds=ROUNDS,
        messages=published.messages,
        promote_s_max=max(promotions),
        first_commit_on_new_primary_s=first_commits[0],
        first_commit_on_new_primary_s_max=max(first_commits),
        redeliveries=state.redeliveries,
        **report.figures(),
    )


# ---------------------------------------------------------------------------------------------
# 3. NATS: a node of three lost


@pytest.fixture
async def cluster() -> AsyncIterator[NatsCluster]:
    with nats_cluster() as started:
        await started.wait_ready()
        yield started


async def _durable_r3(node: NatsNode, settings: Settings) -> None:
    """The worker's durable consumer, made as the worker makes it and then replicated three
    times, as an operator would for a cluster (the worker then binds to it)."""
    nc = await nats.connect(node.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await retrying(lambda: ensure_consumer(js, settings))
        info = await retrying(lambda: js.consumer_info(settings.nats_stream, settings.nats_durable))
        info.config.num_replicas = 3
        await retrying(lambda: js.add_consumer(settings.nats_stream, info.config))
    finally:
        await nc.close()


async def _consumer_replicas(node: NatsNode, route: Route) -> int:
    nc = await nats.connect(node.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        info = await retrying(lambda: js.consumer_info(route.stream, route.durable))
    finally:
        await nc.close()
    return 1 + len(info.cluster.replicas or []) if info.cluster is not None else 1


async def _cluster_run(
    tmp_path: Path,
    database_url: str,
    store: InspectedStore,
    cluster: NatsCluster,
    figures: Figures,
    fault: str,
) -> None:
    """One worker on the seed list of all three nodes, the stream's leader first (so that the
    node it uses is the one that leads the stream); per round, mid-burst, the node the worker
    is connected to is killed and started again (``kill``) or frozen and let go (``pause``)."""
    route = Route(cluster.nodes[0].url)
    leader = await cluster.create_stream(cluster.nodes[0], route.stream, [f"t{route.name}.>"])
    env = {
        **route.env(database_url),
        "ORDERS_NATS_URL": cluster.seed_list(first=cluster.node(leader)),
        "ORDERS_NATS_ACK_WAIT_S": ACK_WAIT_S,
        "ORDERS_NATS_REPLICAS": "3",
    }
    rate = 400.0
    pause_s = 8.0  # > ping_interval (2 s) * ping_max (2): the peers count the node as gone
    published = Published()
    resumed: list[float] = []
    await _durable_r3(cluster.nodes[0], Settings.from_env(env))
    worker = Worker(tmp_path / "worker", **env)
    with worker:
        await worker.wait_ready()
        pid = _pid(worker)
        replicas = await _consumer_replicas(cluster.nodes[0], route)
        for round_ in range(ROUNDS):
            target = cluster.node_at(connected_port(worker.log()))
            # The publisher and the checks go through a node that stays up.
            route.nats_url = next(node for node in cluster.nodes if node is not target).url
            messages = chaos_messages(int(rate * 8), seed=800 + round_)
            publishing = asyncio.create_task(publish_steadily(route, messages, rate=rate))
            await _served_more_than(worker, len(published.valid) + 300)
            at_fault = await orders_served(worker)
            faulted = time.monotonic()
            if fault == "kill":
                target.kill()
            else:
                target.pause()
            await _served_more_than(worker, at_fault + 200)
            resumed.append(time.monotonic() - faulted)
            if fault == "kill":
                target.start()
            else:
                await asyncio.sleep(max(0.0, pause_s - (time.monotonic() - faulted)))
                target.resume()
            published.extend(await publishing)
            await cluster.wait_ready()
            await retrying(lambda: consumer_state(route))  # the consumer has its leader again
        state = await wait_settled(store, route, published, [worker])
        report = await audit(store, published, [worker])
        assert _pid(worker) == pid, "the worker was not restarted"
        worker.check_alive()
        replicas_after = await _consumer_replicas(cluster.nodes[0], route)
    # Read through any node: one that was paused can answer for the stream before it has
    # caught up (seen: last_seq 335 of 3,200, every message acked), so the state must come to
    # drained within a bound, with no worker left to ack anything new.
    final: list[ConsumerState] = []

    async def drained() -> bool:
        final.append(await retrying(lambda: consumer_state(route)))
        return final[-1].drained and final[-1].last_seq >= max(published.sequences)

    await eventually(drained, "every message acked after the stop", 30, lambda: str(final[-1:]))
    figures.record(
        fault=fault,
        rounds=ROUNDS,
        consumer_replicas=replicas,
        consumer_replicas_after=replicas_after,
        messages=published.messages,
        publisher_retries=published.retries,
        consumption_resumed_s=resumed[0],
        consumption_resumed_s_max=max(resumed),
        redeliveries=state.redeliveries,
        **report.figures(),
    )


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_the_nats_node_in_use_lost(
    tmp_path: Path,
    database_url: str,
    store: InspectedStore,
    cluster: NatsCluster,
    figures: Figures,
    fault: str,
) -> None:
    """Promise 1 with a node of three lost, the node the worker is connected to, which leads
    the R3 stream, mid-burst. ``kill``: SIGKILL, started again later; the worker moves to
    another node of its seed list and the stream elects a leader among the two left.
    ``pause``: SIGSTOP, the node stops answering but keeps its sockets open (a paused VM, a
    network that drops packets); consumption resumes through the other two nodes while it is
    frozen, and nothing is lost or stored twice after SIGCONT."""
    await _cluster_run(tmp_path, database_url, store, cluster, figures, fault)
