"""libpq's multi-host connection strings (``postgresql://u@h1:5432,h2:5432/db``), made usable
with aiopg, which cannot follow libpq from one host to the next."""

from __future__ import annotations

import logging
import math

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

log = logging.getLogger(__name__)


def is_multi_host(dsn: str) -> bool:
    """Whether ``dsn`` lists several hosts for libpq to choose from."""
    params = parse_dsn(dsn)
    return "," in params.get("host", "") and "hostaddr" not in params


def pin_host(dsn: str, connect_timeout: float) -> str:
    """``dsn`` itself when it names a single host; else ``dsn`` narrowed to the host libpq
    picks from its list: the first, in order, that answers and suits ``target_session_attrs``.

    aiopg watches the socket a connection is opened on; when a host fails, libpq opens another
    socket for the next, which aiopg never sees, and the connect hangs until its timeout. So
    libpq picks the host here, on a blocking connection, and aiopg is given that host alone.
    The store calls it again when the host it was given fails (a failover), so that it moves
    to whichever host libpq picks then. Blocking: call it from a thread. Raises what
    psycopg2.connect raises.
    """
    # With hostaddr too, libpq pairs the two lists; such a string is left to libpq as it is.
    if not is_multi_host(dsn):
        return dsn
    params = parse_dsn(dsn)
    # libpq waits for each host as long as the OS lets a TCP connect hang, unless told.
    extra = {} if "connect_timeout" in params else {"connect_timeout": math.ceil(connect_timeout)}
    conn = psycopg2.connect(dsn, **extra)
    try:
        host, port = conn.info.host, str(conn.info.port)
    finally:
        conn.close()
    log.info("database: %s port %s answered, of hosts %s", host, port, params["host"])
    pinned: str = make_dsn(dsn, host=host, port=port)
    return pinned
