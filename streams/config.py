"""Configuration from the environment: the one place where every setting is read and checked."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg2
from psycopg2.extensions import parse_dsn

N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """A setting from the environment is malformed; the message names the variable."""


PG_SCHEMES = ("postgres", "postgresql")
NATS_SCHEMES = ("nats", "tls", "ws", "wss")

_HIDDEN = "***"
# libpq's connection parameters whose values are not secret (PostgreSQL 17's list, less
# password and sslpassword). Any other key's value is hidden, a misspelt "password" included.
# fmt: off
_PG_PLAIN_KEYS = frozenset((
    "host", "hostaddr", "port", "dbname", "user", "passfile", "require_auth", "channel_binding",
    "connect_timeout", "client_encoding", "options", "application_name",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "replication", "gssencmode", "sslmode",
    "sslnegotiation", "sslcompression", "sslcert", "sslkey", "sslcertmode", "sslrootcert",
    "sslcrl", "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "krbsrvname", "gsslib", "gssdelegation", "service",
    "target_session_attrs", "load_balance_hosts",
))
# fmt: on
_PG_SECRET_KEYS = frozenset(("password", "sslpassword"))
_PLAIN_USER = re.compile(r"[^\s:/?#@,\[\]]+")
_PORT_PART = re.compile(r"(:[0-9]{0,5})?")
_URL_START = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://")
_NEXT_URL = re.compile(r"(,\s*)(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# A key=value pair of libpq's keyword form: a quoted value ends at an unescaped quote.
_KEYWORD = re.compile(
    r"(?P<key>[^\s=]+)\s*=\s*(?P<value>'(?:[^'\\]|\\.)*(?P<end>')?|(?:[^\s\\]|\\.)*\\?)",
    re.DOTALL,
)
_QUOTED = re.compile(r'"([^"]*)"')
_NATS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NATS_SUBJECT = re.compile(r"^[A-Za-z0-9_*>-]+(\.[A-Za-z0-9_*>-]+)*$")


# Sizes and concurrency limits: one block, because each bounds the next. Only the batch size
# is a setting (Settings.batch_size); these follow from how the parts overlap their work.
#
# The bridge keeps this many NATS fetches (each up to batch_size messages, one envelope) out at
# once: in the agent's queue or waiting for their commit. Every one of them is unacked, so
# nats_max_ack_pending should be at least FETCHES_IN_FLIGHT * batch_size to keep them all busy.
FETCHES_IN_FLIGHT: Final = 4
# The agent puts the envelopes that queued up while it was busy into one commit, up to this
# many: a commit holds at most ENVELOPES_PER_COMMIT * batch_size messages.
ENVELOPES_PER_COMMIT: Final = 4
# Transactions the agent runs at once, each on its own connection: the second waits on the
# append lock inside PostgreSQL and goes on the moment the first commits.
COMMITS_IN_FLIGHT: Final = 2
# A catch-up of the view reads one page on one connection while it asks for the next on a
# second (streams/store.py, read_pages).
CATCH_UP_CONNECTIONS: Final = 2
# The store's pool: commits and a catch-up never wait for each other's connections. (A head
# check of the follower may wait a moment for one; LISTEN has a connection of its own.)
POOL_SIZE: Final = COMMITS_IN_FLIGHT + CATCH_UP_CONNECTIONS


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the service. Each field is read from ``ORDERS_<FIELD>``.

    database_url: PostgreSQL URL, several hosts allowed, or libpq's key=value form; ``None``
        starts an embedded server under ``data_dir``.
    nats_url: NATS URL or comma-separated seed list (``nats_servers`` splits it); ``None``
        starts an embedded nats-server under ``data_dir``.
    web_host / web_port: where the HTTP server listens.
    web_driver: ``fast`` (default; httptools on the worker's loop, :mod:`streams.fast_web`) or
        ``aiohttp`` (Faust's aiohttp driver, :mod:`streams.web_driver`); both serve the same
        routes with the same limits.
    data_dir: embedded servers' data, Faust's own data dir and the files that let the
        publisher find an embedded NATS server.
    batch_size: most messages a NATS fetch brings in; a commit takes up to
        ``ENVELOPES_PER_COMMIT`` fetches (see the limits above).
    batch_max_wait_ms: how long the agent waits to fill a batch before it writes what it has.
    replay_page_size: rows per keyset page when the view is rebuilt from the log.
    snapshot_page_orders: orders per snapshot page a writer stores (streams/snapshots.py): a
        start reads one page per this many orders (about 110 bytes each) instead of as many rows.
    nats_stream / nats_subject / nats_durable: JetStream stream, its subject filter and the
        durable pull consumer the bridge binds.
    nats_ack_wait_s: JetStream redelivers a message not acked within this time; it must be
        longer than a slow batch commit.
    nats_max_ack_pending: most messages handed out and not yet acked: the bound on in-flight work.
    nats_replicas: replicas of the stream the service creates (1 on a single server, 3 on a
        cluster); an existing stream with fewer is warned about.
    log_uids_max: batches up to this size log each stored order_uid; larger ones log a summary.
    log_format: ``text`` (Faust's format) or ``json`` (one object per line).
    consume: ``False`` makes a read replica: it follows the log and serves, never consumes.
    follow_poll_s: how often the view checks the log for commits it was not told of.
    ready_max_lag: /readyz answers 503 while the view is more events behind the log than this.
    event_loop: ``uvloop`` (default) or ``asyncio``, the worker's event loop.
    http_metrics: count HTTP requests and their latency for /metrics (``False`` saves the
        few microseconds a request this costs).
    apply_schema: create the tables at start; ``False`` for a role that may only SELECT and
        INSERT, the schema being applied by its owner (init-db/).
    """

    database_url: str | None = None
    nats_url: str | None = None
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    web_driver: str = "fast"
    data_dir: Path = Path(".data")
    batch_size: int = 1000
    batch_max_wait_ms: int = 20
    replay_page_size: int = 10_000
    snapshot_page_orders: int = 100_000
    nats_stream: str = "ORDERS"
    nats_subject: str = "orders.>"
    nats_durable: str = "orders-writer"
    nats_ack_wait_s: float = 30.0
    nats_max_ack_pending: int = 10_000
    nats_replicas: int = 1
    log_uids_max: int = 10
    log_format: str = "text"
    consume: bool = True
    follow_poll_s: float = 1.0
    ready_max_lag: int = 10_000
    event_loop: str = "uvloop"
    apply_schema: bool = True
    http_metrics: bool = True

    @property
    def nats_servers(self) -> list[str]:
        """The servers of ``nats_url``, in its order; empty when the embedded one is used."""
        return split_nats_servers(self.nats_url) if self.nats_url is not None else []

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and check every ``ORDERS_*`` variable; ConfigError names the first bad one."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            database_url=_database_url(env, "ORDERS_DATABASE_URL"),
            nats_url=_nats_url(env, "ORDERS_NATS_URL"),
            web_host=_text(env, "ORDERS_WEB_HOST", defaults.web_host),
            web_port=_int(env, "ORDERS_WEB_PORT", defaults.web_port, 1, 65535),
            web_driver=_choice(env, "ORDERS_WEB_DRIVER", defaults.web_driver, ("fast", "aiohttp")),
            data_dir=Path(_text(env, "ORDERS_DATA_DIR", str(defaults.data_dir))),
            batch_size=_int(env, "ORDERS_BATCH_SIZE", defaults.batch_size, 1, 100_000),
            batch_max_wait_ms=_int(
                env, "ORDERS_BATCH_MAX_WAIT_MS", defaults.batch_max_wait_ms, 1, 60_000
            ),
            replay_page_size=_int(
                env, "ORDERS_REPLAY_PAGE_SIZE", defaults.replay_page_size, 1, 1_000_000
            ),
            snapshot_page_orders=_int(
                env, "ORDERS_SNAPSHOT_PAGE_ORDERS", defaults.snapshot_page_orders, 1, 10_000_000
            ),
            nats_stream=_name(env, "ORDERS_NATS_STREAM", defaults.nats_stream),
            nats_subject=_subject(env, "ORDERS_NATS_SUBJECT", defaults.nats_subject),
            nats_durable=_name(env, "ORDERS_NATS_DURABLE", defaults.nats_durable),
            nats_ack_wait_s=_float(
                env, "ORDERS_NATS_ACK_WAIT_S", defaults.nats_ack_wait_s, 1.0, 3600.0
            ),
            nats_max_ack_pending=_int(
                env, "ORDERS_NATS_MAX_ACK_PENDING", defaults.nats_max_ack_pending, 1, 1_000_000
            ),
            nats_replicas=_int(env, "ORDERS_NATS_REPLICAS", defaults.nats_replicas, 1, 5),
            log_uids_max=_int(env, "ORDERS_LOG_UIDS_MAX", defaults.log_uids_max, 0, 100_000),
            log_format=_choice(env, "ORDERS_LOG_FORMAT", defaults.log_format, ("text", "json")),
            consume=_bool(env, "ORDERS_CONSUME", defaults.consume),
            apply_schema=_bool(env, "ORDERS_APPLY_SCHEMA", defaults.apply_schema),
            http_metrics=_bool(env, "ORDERS_HTTP_METRICS", defaults.http_metrics),
            event_loop=_choice(
                env, "ORDERS_EVENT_LOOP", defaults.event_loop, ("uvloop", "asyncio")
            ),
            follow_poll_s=_float(env, "ORDERS_FOLLOW_POLL_S", defaults.follow_poll_s, 0.05, 3600.0),
            ready_max_lag=_int(
                env, "ORDERS_READY_MAX_LAG", defaults.ready_max_lag, 0, 1_000_000_000
            ),
        )


def env_name(field: str) -> str:
    """The environment variable of a :class:`Settings` field (``nats_url``: ``ORDERS_NATS_URL``)."""
    if field not in {f.name for f in dataclasses.fields(Settings)}:
        raise KeyError(f"no setting {field!r}")
    return f"ORDERS_{field.upper()}"


def check_nats_name(value: str, source: str) -> str:
    """``value`` if it is a name the service accepts for a stream or consumer, else
    ``ConfigError`` naming ``source``."""
    if not _NATS_NAME.match(value):
        raise ConfigError(f"{source}={value!r}: expected 1 to 64 letters, digits, '_' or '-'")
    return value


def redact(value: str | Iterable[str]) -> str:
    """``value`` fit for a log or an error message: every password and token replaced by ***.

    Takes a PostgreSQL URL (its user stays: a lone userinfo is a user there), libpq's
    ``key=value`` form, a NATS URL or seed list (a lone userinfo is a token there, hidden), or a
    list of URLs, each redacted and joined by commas. Malformed values too: whatever might be
    part of a secret (text before an ``@``, a port that is not a number, a query parameter
    libpq does not list as plain) is hidden rather than shown.
    """
    if not isinstance(value, str):
        return ",".join(redact(item) for item in value)
    start = _URL_START.match(value)
    if start is None and "=" in value:
        return _redact_keywords(value)
    if start is not None and start.group(1).lower() in PG_SCHEMES:
        return _redact_url(value, user_is_plain=True)
    # A NATS seed list: one entry per scheme. A comma not followed by a scheme may be part of
    # a password, so it does not end the entry whose "@" is yet to come.
    pieces = _NEXT_URL.split(value)
    return "".join(
        _redact_url(piece, user_is_plain=False) if index % 2 == 0 else piece
        for index, piece in enumerate(pieces)
    )


def split_nats_servers(value: str) -> list[str]:
    """The servers of a NATS URL or seed list, split at commas as every NATS client does."""
    return [server.strip() for server in value.split(",")]


def check_nats_servers(value: str, source: str) -> list[str]:
    """Every server of ``value`` (one URL or a comma-separated seed list), each checked;
    ``ConfigError`` names ``source`` and says which server is wrong, passwords hidden."""
    servers = split_nats_servers(value)
    for index, server in enumerate(servers, 1):
        problem = _nats_server_problem(server)
        if problem:
            which = list_position("server", index, len(servers))
            raise ConfigError(f"{source}={redact(value)!r}: {which}{problem}")
    websocket = {server.partition("://")[0].lower() in ("ws", "wss") for server in servers}
    if len(websocket) > 1:
        raise ConfigError(
            f"{source}={redact(value)!r}: the list mixes websocket servers (ws://, wss://) with"
            " plain ones (nats://, tls://), which NATS clients refuse"
        )
    return servers


def list_position(noun: str, index: int, count: int) -> str:
    """``"server 2 of 3: "`` to name an entry of a list in a message; nothing for a lone one."""
    return f"{noun} {index} of {count}: " if count > 1 else ""


def _nats_server_problem(server: str) -> str | None:
    if not server:
        return "empty (two commas in a row, or one at an end)"
    if any(char.isspace() for char in server):
        return "a space inside the URL"
    # In lower case, as nats-py looks for them; it takes anything else for a bare host name.
    if server.partition("://")[0] not in NATS_SCHEMES or "://" not in server:
        allowed = ", ".join(f"{scheme}://" for scheme in NATS_SCHEMES)
        return f"expected a URL starting with {allowed}"
    try:
        parts = urlsplit(server)
    except ValueError:  # urlsplit's one complaint: a "[" without its "]"
        return "malformed: an IPv6 address needs its closing ']'"
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked
    except ValueError:
        return "the port is not a number from 0 to 65535"
    if not parts.hostname:
        return "no host"
    return None


def _redact_url(url: str, *, user_is_plain: bool) -> str:
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    else:
        head += sep
    # The userinfo ends at the last "@" before the path, as libpq and urllib agree for a
    # well-formed URL (libpq takes a "?" in a password as part of it).
    slash = rest.find("/")
    at = rest.rfind("@", 0, len(rest) if slash < 0 else slash)
    user = ""
    if at >= 0:
        user = _shown_userinfo(rest[:at], user_is_plain=user_is_plain) + "@"
        rest = rest[at + 1 :]
    rest = _redact_query(rest, plain_keys=_PG_PLAIN_KEYS if user_is_plain else frozenset())
    # An "@" still left means a password with an unencoded "/" (or an "@" in a query value):
    # everything up to it is hidden, however a parser would have split it.
    _, stray, hosts = rest.rpartition("@")
    if stray:
        return f"{head}{user}{_HIDDEN}@{_redact_ports(hosts)}"
    return head + user + _redact_ports(rest)


def _shown_userinfo(userinfo: str, *, user_is_plain: bool) -> str:
    """``user:***``; a lone userinfo is a user for libpq (shown) and a token for NATS (hidden)."""
    user, colon, _ = userinfo.partition(":")
    if not _PLAIN_USER.fullmatch(user) or not (colon or user_is_plain):
        return _HIDDEN
    return f"{user}:{_HIDDEN}" if colon else user


def _redact_query(rest: str, plain_keys: frozenset[str]) -> str:
    path, question, query = rest.partition("?")
    if not question:
        return rest
    shown = []
    for param in query.split("&"):
        key, equals, _ = param.partition("=")
        name = unquote(key).strip().lower()  # libpq decodes keys too: pass%77ord is password
        if equals and name in plain_keys:
            shown.append(param)
        elif equals and name in _PG_SECRET_KEYS:
            shown.append(f"{key}={_HIDDEN}")
        else:
            shown.append(_HIDDEN if param else "")
    return f"{path}?{'&'.join(shown)}"


def _redact_ports(hosts: str) -> str:
    """Hides a port that is not a number: it may be a password whose "@" was left out."""
    end = min((i for i in map(hosts.find, "/?#") if i >= 0), default=len(hosts))
    shown = []
    for hostport in hosts[:end].split(","):
        if hostport.startswith("["):
            close = hostport.find("]")
            host, port = (
                (hostport, "") if close < 0 else (hostport[: close + 1], hostport[close + 1 :])
            )
        else:
            host, colon, number = hostport.partition(":")
            port = colon + number
        shown.append(hostport if _PORT_PART.fullmatch(port) else f"{host}:{_HIDDEN}")
    return ",".join(shown) + hosts[end:]


def _redact_keywords(conninfo: str) -> str:
    """libpq's ``key=value`` form, parsed the way libpq parses it, secrets hidden."""
    shown: list[str] = []
    position = 0
    while position < len(conninfo):
        if conninfo[position].isspace():
            shown.append(conninfo[position])
            position += 1
            continue
        pair = _KEYWORD.match(conninfo, position)
        if pair is None:
            shown.append(_HIDDEN)  # libpq refuses the rest; it may hold a password's tail
            break
        key, value, quoted_end = pair.group("key"), pair.group("value"), pair.group("end")
        position = pair.end()
        if value.startswith("'") and not quoted_end:
            shown.append(f"{key}={_HIDDEN}")
            break
        name = key.lower()
        if name == "dbname" and ("=" in value or "@" in value):
            shown.append(f"{key}={redact(value.strip(chr(39)))}")
        elif name in _PG_PLAIN_KEYS:
            shown.append(f"{key}={value}")
        elif name in _PG_SECRET_KEYS:
            shown.append(f"{key}={_HIDDEN}")
        else:
            shown.append(_HIDDEN)  # not a libpq keyword: perhaps a password's tail
    return "".join(shown)


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    return _raw(env, name) or default


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    return _number(env, name, default, low, high, int, "a whole number")


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    return _number(env, name, default, low, high, float, "a number")


def _number(
    env: Mapping[str, str],
    name: str,
    default: N,
    low: N,
    high: N,
    parse: Callable[[str], N],
    kind: str,
) -> N:
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {kind}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected a number from {low} to {high}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _raw(env, name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _text(env, name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _database_url(env: Mapping[str, str], name: str) -> str | None:
    """A libpq connection string: a ``postgres[ql]://`` URI, with several hosts if need be
    (``h1:5432,h2:5432``), or the ``key=value`` form. libpq reads it here, once, so that its
    complaints come at start and with the password hidden (libpq quotes what it cannot read)."""
    raw = _raw(env, name)
    if raw is None:
        return None
    shown = redact(raw)
    # libpq's own test: a URI starts with one of its two prefixes, in lower case; anything
    # else with an "=" is read as key=value pairs.
    uri = raw.startswith(tuple(f"{scheme}://" for scheme in PG_SCHEMES))
    if not uri and (_URL_START.match(raw) or "=" not in raw):
        raise ConfigError(
            f"{name}={shown!r}: expected a URL starting with postgres:// or postgresql://,"
            " or libpq's key=value form (host=... dbname=...)"
        )
    try:
        params = parse_dsn(raw)
    except psycopg2.Error as error:
        raise ConfigError(
            f"{name}={shown!r}: libpq cannot read it: {_scrub(error, shown)}"
        ) from None
    hosts = params.get("host", "").split(",")
    ports = params["port"].split(",") if "port" in params else []
    for index, port in enumerate(ports, 1):
        if port and not _is_port(port):
            which = list_position("host", index, len(ports))
            raise ConfigError(f"{name}={shown!r}: {which}the port is not a number from 0 to 65535")
    if len(ports) > 1 and len(ports) != len(hosts):
        raise ConfigError(
            f"{name}={shown!r}: {len(hosts)} hosts but {len(ports)} ports;"
            " give one port for all or one per host"
        )
    return raw


def _nats_url(env: Mapping[str, str], name: str) -> str | None:
    raw = _raw(env, name)
    if raw is not None:
        check_nats_servers(raw, name)
    return raw


def _is_port(text: str) -> bool:
    return _PORT_PART.fullmatch(":" + text) is not None and int(text) <= 65535


def _scrub(error: psycopg2.Error, shown: str) -> str:
    """libpq's message with every quoted piece that the redacted value does not show hidden."""
    message = " ".join(str(error).split())
    return _QUOTED.sub(lambda m: m.group(0) if m.group(1) in shown else f'"{_HIDDEN}"', message)


def _name(env: Mapping[str, str], name: str, default: str) -> str:
    return check_nats_name(_text(env, name, default), name)


def _subject(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default)
    if not _NATS_SUBJECT.match(value):
        raise ConfigError(f"{name}={value!r}: expected a NATS subject such as 'orders.>'")
    return value
