"""Real services for the tests: embedded PostgreSQL and NATS by default, the machine's own
when ORDERS_TEST_DATABASE_URL / ORDERS_TEST_NATS_URL are set. Each test gets a database of its
own, so tests never see each other's rows."""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import nats
import psycopg2
import pytest
from nats.aio.client import Client
from psycopg2 import sql

from bridge.embedded_nats import EmbeddedNats
from tests.chaos_servers import Figures
from tests.database import DatabaseSwitch, InspectedStore
from tests.harness import EmbeddedPostgres, Route, embedded_nats, free_port, fresh_database

FIXTURE = Path(__file__).resolve().parent.parent / "publisher" / "model.json"


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """An administrative URL of the PostgreSQL server the tests use."""
    configured = os.environ.get("ORDERS_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    server = EmbeddedPostgres("orders-test")
    try:
        yield server.admin_url
    finally:
        server.close()


@pytest.fixture
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    with fresh_database(postgres_server_url) as url:
        yield url


@pytest.fixture
def database_switch(postgres_server_url: str, database_url: str) -> Iterator[DatabaseSwitch]:
    """Turns the test's database off and on; always on again after the test."""
    switch = DatabaseSwitch(postgres_server_url, database_url)
    try:
        yield switch
    finally:
        switch.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[InspectedStore]:
    """The event store on the test's own database, schema applied."""
    opened = await InspectedStore.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A NATS server with JetStream; tests isolate themselves by stream name."""
    configured = os.environ.get("ORDERS_TEST_NATS_URL")
    if configured:
        yield configured
        return
    with embedded_nats("orders-test") as url:
        yield url


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    """A connection to the session's NATS server."""
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
def route(nats_url: str) -> Route:
    """A stream, consumer and subject of the test's own on the session's NATS server."""
    return Route(nats_url)


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A NATS server of the test's own, to be stopped and started again on the same port."""
    server = EmbeddedNats(tmp_path / "own-nats", port=free_port())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture(params=["fast", "aiohttp"])
def web_driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each web driver in turn (``ORDERS_WEB_DRIVER``) for the workers the test starts: a
    test of the HTTP port marked ``@pytest.mark.usefixtures("web_driver")`` runs on both."""
    driver: str = request.param
    monkeypatch.setenv("ORDERS_WEB_DRIVER", driver)
    return driver


@pytest.fixture
def model_order() -> bytes:
    """The reference order (the 'Wildberries L0' model) as bytes."""
    return FIXTURE.read_bytes()


@pytest.fixture
def figures(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Figures:
    """Where a fault test's figures go: ``[chaos]`` lines, and ``ORDERS_CHAOS_REPORT``."""
    return Figures(request.node.name, capsys)


def as_role(url: str, role: str, password: str) -> str:
    """The same server and database, logged in as ``role`` with ``password``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


@pytest.fixture
def app_role_url(database_url: str, store: InspectedStore) -> Iterator[str]:
    """The URL of a login role that may SELECT and INSERT on the service's tables, and nothing
    more. It has a password of its own: servers that ask for one (scram-sha-256 over TCP, as
    PostgreSQL's Docker image and the compose file's postgres do) refuse a role without one.
    The password is hex, so it goes into the URL as it is."""
    role = f"orders_app_{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(16)
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
            cur.execute(
                sql.SQL("GRANT SELECT, INSERT ON orders_events, orders_dead_letters TO {}").format(
                    sql.Identifier(role)
                )
            )
            cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        yield as_role(database_url, role, password)
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        conn.close()
