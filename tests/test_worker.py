"""The service as a user runs it: ``faust -A streams.app worker``, spoken to over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import psycopg2
import pytest

from streams.store import PostgresEventStore
from streams.validation import Accepted
from tests.database import DatabaseSwitch
from tests.harness import worker_env
from tests.orders import new_uid, order_bytes
from tests.worker import FAUST, Worker


@pytest.mark.usefixtures("web_driver")
async def test_orders_are_served_and_survive_a_restart(
    tmp_path: Path, database_url: str, nats_url: str, store: PostgresEventStore
) -> None:
    first, second = new_uid(), new_uid()
    await store.write_batch([Accepted(first, order_bytes(first))], [])
    worker = Worker(tmp_path, **worker_env(database_url, nats_url))
    with worker:
        ready = await worker.wait_ready()
        assert ready["orders"] == 1
        status, body, content_type = await worker.get(f"/orders/{first}")
        assert (status, content_type) == (200, "application/json")
        assert orjson.loads(body) == orjson.loads(order_bytes(first))
        assert worker.stop() == 0, worker.log()
    assert "view restored: 1 orders from orders_events" in worker.log()

    await store.write_batch([Accepted(second, order_bytes(second))], [])
    with worker.start():
        assert (await worker.wait_ready())["orders"] == 2
        for uid in (first, second):
            status, body, _ = await worker.get(f"/orders/{uid}")
            assert status == 200 and orjson.loads(body)["order_uid"] == uid


@pytest.mark.usefixtures("web_driver")
async def test_http_answers_unknown_and_malformed_uids_clearly(
    tmp_path: Path, database_url: str, nats_url: str
) -> None:
    with Worker(tmp_path, **worker_env(database_url, nats_url)) as worker:
        await worker.wait_ready()
        status, body, content_type = await worker.get("/orders/nosuchorder")
        assert (status, content_type) == (404, "application/json")
        assert orjson.loads(body)["error"] == "order nosuchorder not found"
        for malformed in ("a%20b", "%3Cscript%3E", "x" * 65, "..%2F..%2Fetc", "%C3%A9t%C3%A9"):
            status, body, _ = await worker.get(f"/orders/{malformed}")
            assert status in (400, 404), malformed
            if status == 400:
                assert "malformed order_uid" in orjson.loads(body)["error"]
        status, body, _ = await worker.get("/orders/" + "x" * 65)
        assert status == 400
        status, page, content_type = await worker.get("/")
        assert (status, content_type) == (200, "text/html")
        assert b'<input id="uid"' in page
        status, _, _ = await worker.get("/healthz")
        assert status == 200


@pytest.mark.usefixtures("web_driver")
async def test_readyz_says_503_until_the_view_is_restored(
    tmp_path: Path,
    database_url: str,
    nats_url: str,
    database_switch: DatabaseSwitch,
    store: PostgresEventStore,
) -> None:
    """Started while its database refuses connections, the worker is alive but not ready, and
    an order it cannot know yet is 503 rather than 404; once the database is back it restores
    the view and turns ready."""
    uid = new_uid()
    await store.write_batch([Accepted(uid, order_bytes(uid))], [])
    await store.close()
    database_switch.refuse()
    with Worker(tmp_path, **worker_env(database_url, nats_url)) as worker:
        await worker.wait_alive()
        status, body, _ = await worker.get("/readyz")
        assert status == 503 and orjson.loads(body)["status"] == "restoring"
        status, body, _ = await worker.get(f"/orders/{uid}")
        assert status == 503 and "still loading" in orjson.loads(body)["error"]
        database_switch.allow()
        assert (await worker.wait_ready())["orders"] == 1
        assert "database not reachable, retrying" in worker.log()


def run_replay(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "ORDERS_DATABASE_URL": database_url,
        "ORDERS_DATA_DIR": str(tmp_path),
        "PATH": str(Path(FAUST).parent),
    }
    return subprocess.run(
        [FAUST, "-A", "streams.app", "replay", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_replay_command_reports_count_time_and_rate(
    tmp_path: Path, database_url: str, store: PostgresEventStore
) -> None:
    uids = [new_uid() for _ in range(30)]
    await store.write_batch([Accepted(uid, order_bytes(uid)) for uid in uids], [])
    done = run_replay(tmp_path, database_url)
    assert done.returncode == 0, done.stderr
    assert "replayed 30 events into 30 orders" in done.stdout
    assert "events/s" in done.stdout


async def test_replay_verify_reports_stored_orders_that_fail_validation(
    tmp_path: Path, database_url: str, store: PostgresEventStore
) -> None:
    await store.write_batch([Accepted("good1", order_bytes("good1"))], [])
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:  # written by hand, as an older version might have
        cur.execute(
            "INSERT INTO orders_events (order_uid, event_type, payload)"
            " VALUES ('old1', 'OrderPlaced', '{\"order_uid\": \"old1\"}')"
        )
    conn.close()
    done = run_replay(tmp_path, database_url, "--verify")
    assert done.returncode == 1
    assert "invalid stored order old1: track_number: required field is missing" in done.stdout
    assert "verified 2 stored orders: 1 invalid" in done.stdout


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ORDERS_WEB_PORT", "eighty", "ORDERS_WEB_PORT='eighty': expected a whole number"),
        ("ORDERS_WEB_PORT", "70000", "ORDERS_WEB_PORT=70000: expected a number from 1 to 65535"),
        (
            "ORDERS_DATABASE_URL",
            "mysql://u:secret@h/db",
            "ORDERS_DATABASE_URL='mysql://u:***@h/db': expected a URL starting with postgres://",
        ),
        (
            "ORDERS_NATS_URL",
            "http://localhost:4222",
            "ORDERS_NATS_URL='http://localhost:4222': expected a URL starting with nats://",
        ),
        ("ORDERS_BATCH_SIZE", "0", "ORDERS_BATCH_SIZE=0: expected a number from 1 to 100000"),
        ("ORDERS_NATS_STREAM", "a b", "ORDERS_NATS_STREAM='a b'"),
    ],
)
def test_bad_environment_stops_the_worker_with_a_clear_error(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    env = {"ORDERS_DATA_DIR": str(tmp_path), variable: value}
    done = subprocess.run(
        [FAUST, "-A", "streams.app", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"configuration error: {message}" in done.stderr
    assert "secret" not in done.stderr, "passwords never reach the output"


async def test_json_logs_are_one_object_per_line_with_fields(
    tmp_path: Path, database_url: str, nats_url: str, store: PostgresEventStore
) -> None:
    uid = new_uid()
    await store.write_batch([Accepted(uid, order_bytes(uid))], [])
    env = {**worker_env(database_url, nats_url), "ORDERS_LOG_FORMAT": "json"}
    with Worker(tmp_path, **env) as worker:
        await worker.wait_ready()
        assert worker.stop() == 0
    entries = [orjson.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert len(entries) > 10
    assert all({"timestamp", "level", "logger", "message"} <= set(entry) for entry in entries)
    (restored,) = [entry for entry in entries if entry["message"].startswith("view restored")]
    assert (restored["count"], restored["level"], restored["logger"]) == (
        1,
        "info",
        "streams.runtime",
    )
    assert restored["seq"] >= 1


def test_importing_the_app_module_reads_no_environment_and_builds_nothing(tmp_path: Path) -> None:
    """``import streams.app`` (a test, a tool, a type checker) neither reads the environment
    nor exits nor changes the event loop policy: the app is built when ``faust -A`` reads it."""
    probe = (
        "import asyncio, streams.app as m\n"
        "assert '_the_app' in vars(m) and m._the_app.cache_info().currsize == 0\n"
        "assert type(asyncio.get_event_loop_policy()).__module__.startswith('asyncio')\n"
        "print('imported')\n"
    )
    env = {"ORDERS_DATA_DIR": str(tmp_path), "ORDERS_BATCH_SIZE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == "imported\n", done.stderr
