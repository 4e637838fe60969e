"""Folders and files only the service's own user may read: the data dir and the embedded
servers' credentials in it."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing; if it exists, take away every right of others and
    of the group, to 0700. Returns ``path``.

    A folder handed to another group than its owner's own keeps that group's right to
    traverse: that is how the embedded PostgreSQL, run as its own user when the service runs
    as root, reaches its data (see :mod:`streams.embedded_postgres`).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = path.stat()
    mode = stat.S_IMODE(status.st_mode)
    taken = stat.S_IRWXO | stat.S_IRWXG
    own = _own_group(status.st_uid)
    if own is not None and status.st_gid != own:
        taken &= ~stat.S_IXGRP
    narrowed = mode & ~taken
    if narrowed != mode:
        path.chmod(narrowed)
    return path


def _own_group(uid: int) -> int | None:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return None


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600 from the first byte (written aside, then
    renamed, so no reader ever sees a wider or a half-written file)."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        aside.unlink()
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(aside, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
        raise


def secret(path: Path) -> str:
    """The secret kept in ``path``, generated (URL-safe, 256 bits) and stored 0600 if missing."""
    try:
        kept = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return kept
    generated = secrets.token_urlsafe(32)
    write_private(path, generated + "\n")
    return generated
