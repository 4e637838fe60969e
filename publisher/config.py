"""Where to publish: NATS URL, subject and stream, from arguments, environment or the data dir."""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bridge.embedded_nats import URL_FILE
from streams.config import ConfigError as SettingError
from streams.config import (
    Settings,
    check_nats_name,
    check_nats_servers,
    env_name,
    list_position,
    redact,
    split_nats_servers,
)

# The service's own settings, under the service's names: the publisher finds what it runs.
URL_ENV = env_name("nats_url")
# The service's subject filter; a stream created here captures it, as the service's would.
SERVICE_FILTER_ENV = env_name("nats_subject")
STREAM_ENV = env_name("nats_stream")
DATA_DIR_ENV = env_name("data_dir")
REPLICAS_ENV = env_name("nats_replicas")
DEFAULT_STREAM = Settings.nats_stream
DEFAULT_DATA_DIR = str(Settings.data_dir)
URL_FILE_NAME = URL_FILE
# The publisher's own: the subject it publishes to (the service reads a filter, not a subject).
SUBJECT_ENV = "ORDERS_NATS_PUBLISH_SUBJECT"
DEFAULT_SUBJECT = "orders.new"

_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")


class ConfigError(ValueError):
    """A setting is present but unusable."""


class NoUrlError(LookupError):
    """No NATS URL was given and no running service advertised one."""


@dataclass(frozen=True)
class ResolvedUrl:
    url: str
    source: str  # where the URL came from, for error messages

    @property
    def servers(self) -> list[str]:
        """The servers to try, in order: one, or those of a seed list."""
        return split_nats_servers(self.url)

    def __str__(self) -> str:
        return f"{redact(self.url)} (from {self.source})"


def resolve_url(
    cli_url: str | None, env: Mapping[str, str], cwd: Path | None = None
) -> ResolvedUrl:
    """Pick the NATS URL: ``--url``, else ``$ORDERS_NATS_URL``, else the service's URL file.

    The file sits in ``$ORDERS_DATA_DIR`` (default ``./.data``); the service writes it when it
    starts an embedded NATS server, so an unconfigured publisher finds that server.
    Raises ``ConfigError`` for an unusable URL and ``NoUrlError`` when there is none.
    """
    if cli_url is not None:
        return ResolvedUrl(check_url(cli_url, "--url"), "--url")
    if env.get(URL_ENV):
        return ResolvedUrl(check_url(env[URL_ENV], URL_ENV), URL_ENV)
    data_dir = Path(env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    url_file = (cwd or Path.cwd()) / data_dir / URL_FILE_NAME
    try:
        text = url_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise NoUrlError(
            f"no NATS URL: start the orders service first (it writes {url_file}), "
            f"or pass --url or set {URL_ENV}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {url_file}: {error}") from None
    return ResolvedUrl(check_url(text, str(url_file)), str(url_file))


def check_url(url: str, source: str) -> str:
    """Return ``url`` stripped if it is a NATS URL or seed list (``nats://a:4222,nats://b:4222``)
    whose every server is usable, else raise ``ConfigError``, passwords hidden."""
    url = url.strip()
    try:
        servers = check_nats_servers(url, source)
    except SettingError as error:
        raise ConfigError(str(error)) from None
    for index, server in enumerate(servers, 1):
        if urlsplit(server).port == 0:
            which = list_position("server", index, len(servers))
            raise ConfigError(f"{source}={redact(url)!r}: {which}port 0")
    return url


def check_subject(subject: str, source: str) -> str:
    """Return ``subject`` if one can publish to it: dot-separated tokens, no wildcards."""
    if not subject or not all(_SUBJECT_TOKEN.fullmatch(token) for token in subject.split(".")):
        raise ConfigError(
            f"{source}: {subject!r} is not a publishable subject (dot-separated tokens such as"
            " orders.new, without spaces or the wildcards * and >)"
        )
    return subject


def stream_replicas(env: Mapping[str, str]) -> int:
    """The replicas of a stream created here: the service's ``ORDERS_NATS_REPLICAS``, read
    and checked as the service reads it."""
    try:
        return Settings.from_env(
            {REPLICAS_ENV: env[REPLICAS_ENV]} if env.get(REPLICAS_ENV) else {}
        ).nats_replicas
    except SettingError as error:
        raise ConfigError(str(error)) from None


def check_stream_name(name: str, source: str) -> str:
    """Return ``name`` if the service accepts it as its stream's name (``ORDERS_NATS_STREAM``):
    a stream the publisher creates is one the service can bind."""
    try:
        return check_nats_name(name, source)
    except SettingError as error:
        raise ConfigError(str(error)) from None
