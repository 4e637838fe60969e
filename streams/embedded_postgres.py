"""The embedded PostgreSQL (from pgserver) used when no ORDERS_DATABASE_URL is set."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Final

import psycopg2
from psycopg2 import sql

# pgserver asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR (containers,
# CI) that warns, and the fallback it takes is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
from pgserver.postgres_server import get_server  # noqa: E402

DATABASE: Final = "orders"

# pgserver narrates every step at INFO; the service logs the one line an operator needs.
logging.getLogger("pgserver").setLevel(logging.WARNING)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the server kept in ``data_dir/postgres`` and return its URL.

    The server listens on a Unix socket inside its own data directory, never on a TCP port,
    so it cannot collide with another PostgreSQL on the machine. It stops when the last
    process using it exits. Blocking: call it from a thread in async code.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir.resolve() / "postgres", cleanup_mode="stop")
    _ensure_database(server.get_uri("postgres"), DATABASE)
    url: str = server.get_uri(DATABASE)
    (data_dir / "postgres.url").write_text(url + "\n", encoding="utf-8")
    return url


def _ensure_database(admin_url: str, name: str) -> None:
    conn = psycopg2.connect(admin_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
