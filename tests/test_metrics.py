"""GET /metrics after a known run tells exactly what happened in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from publisher.messages import Message
from tests.flow import wait_for_orders
from tests.harness import Route, metric_key, parse_metrics
from tests.orders import orders
from tests.worker import Worker


@pytest.mark.usefixtures("web_driver")
async def test_metrics_count_a_known_run(tmp_path: Path, database_url: str, route: Route) -> None:
    good = orders(5, seed=31)
    repeated = Message(good[0].data, "duplicate", good[0].uid)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send([*good, b"{oops", b"[]", repeated])
        await wait_for_orders(worker, 5)
        for path in (
            f"/orders/{good[1].uid}",
            f"/orders/{good[2].uid}",
            "/orders/nope",
            "/orders/a.b",
        ):
            await worker.get(path)
        status, body, content_type = await worker.get("/metrics")
    assert (status, content_type) == (200, "text/plain")
    found = parse_metrics(body.decode())

    def value(name: str, **labels: str) -> float:
        return found[metric_key(name, **labels)]

    assert value("orders_messages_received_total") == 8
    assert value("orders_stored_total") == 5
    assert value("orders_duplicates_total") == 1
    assert value("orders_conflicting_duplicates_total") == 0
    assert value("orders_dead_lettered_total", reason="json") == 1
    assert value("orders_dead_lettered_total", reason="schema") == 1
    assert value("orders_view_orders") == 5
    assert value("orders_view_last_seq") >= 5
    assert value("orders_nats_connected") == 1
    assert value("orders_batch_size_count") == value("orders_batches_committed_total") >= 1
    assert value("orders_batch_size_sum") == 8
    assert value("orders_http_requests_total", route="order", status="200") == 2
    assert value("orders_http_requests_total", route="order", status="404") == 1
    assert value("orders_http_requests_total", route="order", status="400") == 1
    assert value("orders_http_request_seconds_count", route="order") == 4
    assert value("orders_http_request_seconds_bucket", route="order", le="+Inf") == 4
    assert value("orders_view_restore_seconds") >= 0
