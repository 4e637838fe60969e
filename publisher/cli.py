"""Command line: ``orders-publisher`` / ``python -m publisher``."""

import argparse
import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nats.errors
from nats.aio.client import Client
from tqdm import tqdm  # type: ignore[import-untyped]

from publisher import config
from publisher.generate import OrderFactory
from publisher.messages import Message, file_messages, generated_messages
from publisher.publish import PublishError, PublishStats, publish
from publisher.stream import StreamError, ensure_stream

PROG = "orders-publisher"
DEFAULT_ITEMS = 3
# A progress bar only pays for itself on runs long enough to watch.
PROGRESS_MIN_COUNT = 1000
CONNECT_TIMEOUT_SECONDS = 5
ACK_TIMEOUT_SECONDS = 10.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # what argparse exits with on bad arguments
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Options:
    url: config.ResolvedUrl
    subject: str
    stream: str
    service_filter: str | None
    replicas: int  # of a stream created here: the service's ORDERS_NATS_REPLICAS
    rate: float | None
    file: Path | None
    count: int
    duplicates: float
    invalid: float
    items: int
    seed: int | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Generate unique orders from the model order and publish them to NATS JetStream. "
            "Prints the uid of every new order on stdout, one per line, and a summary on stderr."
        ),
        epilog=(
            f"The URL comes from --url, else ${config.URL_ENV}, else the file "
            f"${config.DATA_DIR_ENV}/{config.URL_FILE_NAME} (default ./{config.DEFAULT_DATA_DIR}/"
            f"{config.URL_FILE_NAME}) written by the running service. If no stream stores the "
            "subject yet, the stream is created."
        ),
    )
    what = parser.add_argument_group("what to publish")
    what.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="messages to publish (default 1)",
    )
    what.add_argument(
        "--duplicates",
        type=_share,
        metavar="P",
        help=(
            "share of messages that repeat an earlier order's uid, with the same or a different"
            " payload (default 0)"
        ),
    )
    what.add_argument(
        "--invalid",
        type=_share,
        metavar="P",
        help="share of malformed messages the service must reject (default 0)",
    )
    what.add_argument(
        "--items",
        type=_positive_int,
        metavar="N",
        help=f"maximum items per order (default {DEFAULT_ITEMS})",
    )
    what.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help=(
            "seed for a reproducible run; the same seed gives the same uids, which the service"
            " then treats as duplicates"
        ),
    )
    what.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help=(
            "publish this JSON file instead of generated orders: its exact bytes, or each element"
            " of a JSON array"
        ),
    )
    how = parser.add_argument_group("how and where to publish")
    how.add_argument(
        "--rate",
        type=_rate,
        metavar="R",
        help="maximum messages per second (default: as fast as possible)",
    )
    how.add_argument(
        "--url",
        metavar="URL",
        help=f"NATS server URL (default ${config.URL_ENV} or the service's URL file)",
    )
    how.add_argument(
        "--subject",
        metavar="SUBJ",
        help=f"subject to publish to (default ${config.SUBJECT_ENV} or {config.DEFAULT_SUBJECT})",
    )
    how.add_argument(
        "--stream",
        metavar="NAME",
        help=(
            f"stream to create if none stores the subject (default ${config.STREAM_ENV} or"
            f" {config.DEFAULT_STREAM})"
        ),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad arguments, 1 for failures)."""
    parser = build_parser()
    try:
        options = _options(parser, parser.parse_args(argv), os.environ)
    except SystemExit as exit_request:
        # argparse exits by itself on bad arguments and --help; callers of main() get the
        # status returned like any other outcome.
        code = exit_request.code
        if code is None:
            return EXIT_OK
        return code if isinstance(code, int) else EXIT_USAGE
    except config.NoUrlError as error:
        _error(str(error))
        return EXIT_FAILED
    try:
        return asyncio.run(_run(options))
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED


def _options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, env: Mapping[str, str]
) -> Options:
    if args.file is not None:
        generation = ("count", "duplicates", "invalid", "items", "seed")
        given = [f"--{name}" for name in generation if getattr(args, name) is not None]
        if given:
            parser.error(
                "--file publishes the file's content and cannot be combined with "
                + ", ".join(given)
            )
        if not args.file.exists():
            parser.error(f"--file: {args.file} does not exist")
        if not args.file.is_file():
            parser.error(f"--file: {args.file} is not a regular file")
    duplicates = args.duplicates or 0.0
    invalid = args.invalid or 0.0
    if duplicates + invalid > 1.0:
        parser.error(f"--duplicates {duplicates:g} and --invalid {invalid:g} add up to more than 1")

    try:
        url = config.resolve_url(args.url, env)
        subject = _setting(
            args.subject, "--subject", env, config.SUBJECT_ENV, config.DEFAULT_SUBJECT
        )
        stream = _setting(args.stream, "--stream", env, config.STREAM_ENV, config.DEFAULT_STREAM)
        config.check_subject(*subject)
        config.check_stream_name(*stream)
        replicas = config.stream_replicas(env)
    except config.ConfigError as error:
        parser.error(str(error))
    return Options(
        url=url,
        subject=subject[0],
        stream=stream[0],
        service_filter=env.get(config.SERVICE_FILTER_ENV) or None,
        replicas=replicas,
        rate=args.rate,
        file=args.file,
        count=args.count or 1,
        duplicates=duplicates,
        invalid=invalid,
        items=args.items or DEFAULT_ITEMS,
        seed=args.seed,
    )


def _setting(
    given: str | None, flag: str, env: Mapping[str, str], name: str, default: str
) -> tuple[str, str]:
    """``(value, where it came from)`` for an option that may also come from the environment."""
    if given is not None:
        return given, flag
    if env.get(name):
        return env[name], name
    return default, "default"


class _FailedError(Exception):
    """The run cannot go on; the message is already phrased for the user."""


async def _run(options: Options) -> int:
    try:
        messages, total = _messages(options)
        nc = await _connect(options.url)
        try:
            stats = await _publish(nc, options, messages, total)
        finally:
            await _close(nc)
    except _FailedError as error:
        _error(str(error))
        return EXIT_FAILED

    print(stats.summary(options.subject), file=sys.stderr)
    if stats.dropped_by_jetstream:
        _error(
            f"warning: JetStream dropped {stats.dropped_by_jetstream} of them as already"
            " seen (same Nats-Msg-Id within the stream's duplicate window, e.g. a rerun"
            " with the same --seed)"
        )
    return EXIT_OK


def _messages(options: Options) -> tuple[Iterable[Message], int]:
    """The messages to publish, and how many there are."""
    if options.file is None:
        factory = OrderFactory(seed=options.seed, max_items=options.items)
        generated = generated_messages(factory, options.count, options.duplicates, options.invalid)
        return generated, options.count
    try:
        loaded = file_messages(options.file)
    except OSError as error:
        raise _FailedError(f"cannot read {options.file}: {error.strerror or error}") from None
    if not loaded:
        raise _FailedError(f"{options.file} holds an empty array: nothing to publish")
    return loaded, len(loaded)


async def _connect(url: config.ResolvedUrl) -> Client:
    nats_errors = _NatsErrors()
    nc = Client()
    try:
        await nc.connect(
            servers=url.servers,
            # The first server listed is tried first, then the next: a seed list fails over
            # within this first connection, as the service's does.
            dont_randomize=True,
            name=PROG,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            # A one-shot command should fail fast and say why. allow_reconnect=False alone
            # is not enough: nats-py still retries the first connection up to
            # max_reconnect_attempts times, reconnect_time_wait apart (two minutes by
            # default). 1 is the smallest limit it honours (0 means unlimited).
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=nats_errors.report,
        )
    except (OSError, TimeoutError, nats.errors.Error) as error:
        # NoServersError only says that the attempts ran out; the last attempt's error,
        # passed to error_cb, says why.
        cause = nats_errors.last if isinstance(error, nats.errors.NoServersError) else None
        reason = _describe_connect_error(cause or error)
        if url.source.endswith(config.URL_FILE_NAME):
            reason += " (is the orders service running?)"
        # Releases what a half-made connection holds, e.g. the aiohttp client behind ws:// URLs.
        await _close(nc)
        raise _FailedError(f"cannot connect to NATS at {url}: {reason}") from None
    nats_errors.connected = True
    return nc


def _describe_connect_error(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_SECONDS} s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    # Some errors (aiohttp's, for ws://) quote whole server responses over several lines.
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


async def _publish(
    nc: Client, options: Options, messages: Iterable[Message], total: int
) -> PublishStats:
    js = nc.jetstream()
    try:
        warning = await ensure_stream(
            js, options.stream, options.subject, options.service_filter, options.replicas
        )
    except StreamError as error:
        raise _FailedError(str(error)) from None
    if warning:
        _error(f"warning: {warning}")

    printer = _UidPrinter(sys.stdout)
    # A bar on stderr for long runs watched from a terminal only.
    shown = total >= PROGRESS_MIN_COUNT and sys.stderr.isatty()
    with tqdm(
        total=total, unit="msg", file=sys.stderr, dynamic_ncols=True, disable=not shown
    ) as progress:

        def on_ack(message: Message) -> None:
            if message.kind == "order" and message.uid:
                printer.print(message.uid)
            progress.update(1)

        try:
            return await publish(
                nc,
                options.subject,
                messages,
                rate=options.rate,
                on_ack=on_ack,
                ack_timeout=ACK_TIMEOUT_SECONDS,
            )
        except PublishError as error:
            summary = error.stats.summary(options.subject)
            raise _FailedError(f"publishing stopped: {error}\n{summary}") from None


class _NatsErrors:
    """Reports asynchronous NATS errors as one line each instead of nats-py's logged traceback."""

    def __init__(self) -> None:
        # Until connected, errors are kept for the connect failure message instead of printed.
        self.connected = False
        self.last: Exception | None = None

    async def report(self, error: Exception) -> None:
        self.last = error
        if self.connected:
            _error(f"NATS error: {str(error) or type(error).__name__}")


class _UidPrinter:
    """Writes uids one per line, flushed; keeps publishing if the reader goes away (``| head``)."""

    def __init__(self, out: IO[str]) -> None:
        self._out: IO[str] | None = out

    def print(self, uid: str) -> None:
        if self._out is None:
            return
        try:
            self._out.write(uid + "\n")
            self._out.flush()
        except BrokenPipeError:
            self._out = None
            # Python would otherwise hit the broken pipe again when flushing stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


async def _close(nc: Client) -> None:
    # The outcome is already decided; a failing close adds nothing the user can act on.
    with contextlib.suppress(OSError, nats.errors.Error):
        await nc.close()


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _share(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _rate(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a positive number of messages per second, got {text}"
        )
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
