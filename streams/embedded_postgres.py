"""The embedded PostgreSQL used when no ORDERS_DATABASE_URL is set: pgserver's binaries,
started here with flags of the service's choosing.

pgserver's own start-up trusts every connection (``initdb --auth=trust``), widens every folder
above the data dir to 0755 when run as root, and, when the data dir's path is too long for a
Unix socket, puts the socket in a shared runtime folder (0777 as root) where any local user
could connect as superuser. Here instead:

- every connection, over the socket as over TCP, needs the password (scram-sha-256), generated
  at first start into ``postgres.password`` (0600), which the URL names as its ``passfile``:
  the URL itself, which the service logs, holds no secret;
- the server listens on no TCP address, only on a socket in its data folder (0700, itself in
  the service's data dir), or, when that path is too long, in a fresh 0700 folder of its own;
- no folder is widened. As root (PostgreSQL refuses to run as root) the server runs as the
  system user ``pgserver``, as pgserver does; the data dir is handed to that user's group with
  the right to traverse only (0710), and a folder above that the user cannot enter is an
  error that names it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import grp
import json
import logging
import os
import pwd
import shlex
import socket
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

import psycopg2
from psycopg2 import sql

from streams.private_files import private_dir, secret, write_private

# pgserver asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR (containers,
# CI) that warns, and nothing here uses that dir.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
try:
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_user_exists
except ImportError:  # the "embedded" extra is not installed (the image): a URL is required
    AVAILABLE = False
else:
    AVAILABLE = True

log = logging.getLogger(__name__)

DATABASE: Final = "orders"
MISSING: Final = "set ORDERS_DATABASE_URL or install orders-stream[embedded]"
SUPERUSER: Final = "postgres"
SYSTEM_USER: Final = "pgserver"  # pgserver's choice, kept so that its clusters stay usable
PORT: Final = 5432  # only names the socket file: there is no TCP listener
# sun_path holds 108 bytes with the terminating NUL.
_SOCKET_PATH_MAX: Final = 107
_HBA: Final = """\
# Written by the orders service at every start: every connection needs the password.
local all all scram-sha-256
host  all all 0.0.0.0/0 scram-sha-256
host  all all ::/0 scram-sha-256
"""


class EmbeddedPostgresError(RuntimeError):
    """The embedded server cannot be started safely; the message says why and what to do."""


@dataclass(frozen=True)
class _RunAs:
    """Who runs the server: this process's user, or (as root) the system user ``pgserver``."""

    uid: int
    gid: int
    name: str

    @property
    def other(self) -> bool:
        return self.uid != os.geteuid()


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the server kept in ``data_dir/postgres`` and return its URL.

    It stops when the last process using it exits. Blocking: call it from a thread in async
    code.
    """
    if not AVAILABLE:
        raise EmbeddedPostgresError(MISSING)
    data_dir = private_dir(data_dir).resolve()
    run_as = _run_as()
    pgdata = data_dir / "postgres"
    if run_as.other:
        _hand_over(data_dir, pgdata, run_as)
    else:
        private_dir(pgdata)
    password_file = data_dir / "postgres.password"
    passfile = data_dir / "postgres.pgpass"
    with _lock(data_dir / "postgres.lock"):
        new_password = not password_file.exists()
        password = secret(password_file)
        write_private(passfile, f"*:*:*:{SUPERUSER}:{password}\n")
        running = _running_socket_dir(pgdata)
        if running is None:
            if not (pgdata / "PG_VERSION").exists():
                _initdb(pgdata, password, run_as)
            elif new_password:
                # A cluster from before passwords: give its superuser one, with no server up.
                _set_password(pgdata, password, run_as)
            _write_hba(pgdata, run_as)
            running = _start(pgdata, run_as)
        _handles(pgdata, add=os.getpid())
    atexit.register(_release, data_dir, pgdata, run_as)
    url = _url(running, passfile, DATABASE)
    _ensure_database(_url(running, passfile, SUPERUSER), DATABASE)
    write_private(data_dir / "postgres.url", url + "\n")
    return url


def _url(socket_dir: Path, passfile: Path, database: str) -> str:
    # Percent-encoded, which libpq decodes: a folder's name may hold spaces, '&' or '='.
    host, pgpass = (quote(str(path), safe="/") for path in (socket_dir, passfile))
    return f"postgresql://{SUPERUSER}@/{database}?host={host}&port={PORT}&passfile={pgpass}"


def _run_as() -> _RunAs:
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return _RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)
    ensure_user_exists(SYSTEM_USER)
    system = pwd.getpwnam(SYSTEM_USER)
    return _RunAs(system.pw_uid, system.pw_gid, SYSTEM_USER)


def _hand_over(data_dir: Path, pgdata: Path, run_as: _RunAs) -> None:
    """As root: let the server's user reach ``pgdata`` without widening anything."""
    for folder in reversed(data_dir.parents):
        if not _may_traverse(folder, run_as):
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL runs as the user {run_as.name!r} (PostgreSQL refuses"
                f" to run as root), who cannot enter {folder} (mode"
                f" {oct(stat.S_IMODE(folder.stat().st_mode))}); this service widens no folder."
                " Set ORDERS_DATA_DIR to a folder that user can reach, run the service as an"
                " unprivileged user, or set ORDERS_DATABASE_URL"
            )
    os.chown(data_dir, -1, run_as.gid)
    data_dir.chmod(0o710)  # the group (that user's own) may pass through, not list or write
    pgdata.mkdir(mode=0o700, exist_ok=True)
    os.chown(pgdata, run_as.uid, run_as.gid)
    pgdata.chmod(0o700)


def _may_traverse(folder: Path, run_as: _RunAs) -> bool:
    status = folder.stat()
    if status.st_uid == run_as.uid:
        return bool(status.st_mode & stat.S_IXUSR)
    groups = {run_as.gid, *(g.gr_gid for g in grp.getgrall() if run_as.name in g.gr_mem)}
    if status.st_gid in groups:
        return bool(status.st_mode & stat.S_IXGRP)
    return bool(status.st_mode & stat.S_IXOTH)


def _run(args: list[str], run_as: _RunAs, stdin: str | None = None) -> None:
    """A PostgreSQL program as the server's user; its output in the error if it fails."""
    result = subprocess.run(
        [str(POSTGRES_BIN_PATH / args[0]), *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        user=run_as.uid if run_as.other else None,
        group=run_as.gid if run_as.other else None,
        extra_groups=[] if run_as.other else None,
        cwd="/",
    )
    if result.returncode != 0:
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL: {args[0]} failed ({result.returncode}):\n"
            f"{(result.stdout + result.stderr).strip()[-3000:]}"
        )


def _initdb(pgdata: Path, password: str, run_as: _RunAs) -> None:
    # initdb reads the password from a file (a command line is readable by every local user):
    # one beside the data folder, 0600, for the server's user, and gone once read.
    pwfile = pgdata.parent / "postgres.initdb-password"
    write_private(pwfile, password + "\n")
    try:
        if run_as.other:
            os.chown(pwfile, run_as.uid, run_as.gid)
        _run(
            [
                "initdb",
                "-D",
                str(pgdata),
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=utf8",
            ],
            run_as,
        )
    finally:
        pwfile.unlink()


def _set_password(pgdata: Path, password: str, run_as: _RunAs) -> None:
    # Single-user mode: no socket, no authentication, the statement on stdin. The secret is
    # URL-safe base64, which needs no quoting.
    _run(
        ["postgres", "--single", "-D", str(pgdata), "postgres"],
        run_as,
        stdin=f"ALTER ROLE {SUPERUSER} PASSWORD '{password}'\n",
    )


def _write_hba(pgdata: Path, run_as: _RunAs) -> None:
    hba = pgdata / "pg_hba.conf"
    write_private(hba, _HBA)
    if run_as.other:
        os.chown(hba, run_as.uid, run_as.gid)


def _socket_dir(pgdata: Path, run_as: _RunAs) -> Path:
    """The data folder when the socket's path fits, else a fresh 0700 folder of its own."""
    if len(str(pgdata / f".s.PGSQL.{PORT}")) <= _SOCKET_PATH_MAX:
        return pgdata
    folder = Path(tempfile.mkdtemp(prefix="orders-pg-"))  # 0700, a name no one could predict
    if run_as.other:
        os.chown(folder, run_as.uid, run_as.gid)
    return folder


def _start(pgdata: Path, run_as: _RunAs) -> Path:
    socket_dir = _socket_dir(pgdata, run_as)
    # pg_ctl hands these to postgres through a shell: hence the quoting.
    options = " ".join(
        [
            "-h ''",  # no TCP address at all
            f"-p {PORT}",
            f"-k {shlex.quote(str(socket_dir))}",
            "-c unix_socket_permissions=0700",
        ]
    )
    server_log = pgdata / "log"
    start = ["pg_ctl", "-D", str(pgdata), "-w", "-t", "60", "-l", str(server_log), "-o", options]
    try:
        _run([*start, "start"], run_as)
    except EmbeddedPostgresError as error:
        try:
            tail = server_log.read_text(errors="replace")[-2000:]
        except OSError:
            tail = "(no server log)"
        raise EmbeddedPostgresError(f"{error}\nthe end of {server_log}:\n{tail}") from None
    return socket_dir


def _running_socket_dir(pgdata: Path) -> Path | None:
    """The socket folder of the server running on ``pgdata``, if one is running and ready."""
    try:
        lines = (pgdata / "postmaster.pid").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    try:
        pid = int(lines[0])
    except (ValueError, IndexError):
        return None
    if not _alive(pid) or len(lines) < 8 or lines[7].strip() != "ready" or not lines[4].strip():
        return None
    socket_dir = Path(lines[4].strip())
    return socket_dir if _socket_answers(socket_dir) else None


def _socket_answers(socket_dir: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_dir / f".s.PGSQL.{PORT}"))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One process at a time starts, joins or stops the server of a data dir."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _handles(pgdata: Path, *, add: int | None = None, remove: int | None = None) -> list[int]:
    """The live processes using the server (a list kept beside it), after the change."""
    path = pgdata.parent / "postgres.handles"
    try:
        pids = [int(pid) for pid in json.loads(path.read_text(encoding="utf-8"))]
    except (FileNotFoundError, ValueError, TypeError):
        pids = []
    pids = [pid for pid in pids if pid != remove and _alive(pid)]
    if add is not None and add not in pids:
        pids.append(add)
    write_private(path, json.dumps(pids))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, as another user
    return True


def _release(data_dir: Path, pgdata: Path, run_as: _RunAs) -> None:
    """At exit: stop the server if no other process uses it any more."""
    with _lock(data_dir / "postgres.lock"):
        if _handles(pgdata, remove=os.getpid()):
            return
        socket_dir = _running_socket_dir(pgdata)
        if socket_dir is None:
            return
        try:
            _run(["pg_ctl", "-D", str(pgdata), "-w", "-m", "fast", "stop"], run_as)
        except (EmbeddedPostgresError, subprocess.TimeoutExpired) as error:
            log.warning("embedded PostgreSQL in %s not stopped: %s", pgdata, error)
            return
        if socket_dir != pgdata:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()


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
