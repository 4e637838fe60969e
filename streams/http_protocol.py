"""HTTP/1.1 server connections on asyncio with httptools' parser (llhttp): the fast web
driver's wire protocol.

What a connection does, in the order of the RFC 9112 sections it follows:

- persistent connections: HTTP/1.1 stays open unless ``Connection: close``; HTTP/1.0 closes
  after the answer unless ``Connection: keep-alive``, which the answer then repeats;
- pipelining: requests sent back to back are answered in order, even when one of them is
  answered later than the next would be;
- ``HEAD``: the head ``GET`` would have, with its ``Content-Length``, and no body;
- refusals: a malformed request is answered 400, a request target longer than
  :data:`~streams.http_limits.MAX_LINE_SIZE` 414, a header field longer than
  :data:`~streams.http_limits.MAX_FIELD_SIZE` or more than
  :data:`~streams.http_limits.MAX_HEADERS` fields 431, a body larger than
  :data:`~streams.http_limits.MAX_BODY_SIZE` 413; each refusal closes the connection;
- ``Date`` and ``Content-Length`` on every answer;
- a connection with no complete request head for
  :data:`~streams.http_limits.KEEPALIVE_TIMEOUT_S` (new, trickling a head in, or idle after an
  answer) is closed;
- stopping: the listener closes, idle connections close, answers under way are finished and
  sent with ``Connection: close``, and whatever is left after
  :data:`~streams.http_limits.SHUTDOWN_GRACE_S` is cut.

Answers come from one callable, ``respond(request)``, returning a :class:`Response` or a
coroutine that returns one. A coroutine is run at once, in place: when it finishes without
waiting for anything, as every view of this service does, its answer is written without a
task being made for it; one that waits is handed to a task that carries on from where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final, cast

import httptools
import orjson

from streams.http_limits import (
    KEEPALIVE_TIMEOUT_S,
    MAX_BODY_SIZE,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    REFUSAL_HEADERS,
    SHUTDOWN_GRACE_S,
)
from streams.http_message import Request, Response, ResponseHeads, http_date

log = logging.getLogger(__name__)

Respond = Callable[[Request], "Response | Coroutine[Any, Any, Any]"]
# The body of an immediate answer, from the route's last path segment alone, at once; None has
# the request answered the usual way (through ``respond``).
BodyAt = Callable[[str], "bytes | None"]

# The whole head may not exceed a request line and every field at their limits: a bound on
# what a connection buffers however the head is cut into packets.
MAX_HEAD_SIZE: Final = MAX_LINE_SIZE + MAX_HEADERS * (MAX_FIELD_SIZE + 4) + 4
# Requests read ahead of their answer on one connection; past this the connection stops
# reading until the answers catch up.
PIPELINE_DEPTH: Final = 64
_VERSIONS: Final = ("1.1", "1.0")
# RFC 3986's unreserved characters: a path segment of these alone is the same once decoded.
_UNRESERVED: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_NO_BODY_STATUSES: Final = frozenset((204, 304))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The JSON answer ``{"error": message, "status": status}`` the service gives for errors."""
    return Response(
        orjson.dumps({"error": message, "status": status}),
        status=status,
        content_type="application/json",
        headers={**REFUSAL_HEADERS, **(headers or {})},
    )


_INTERNAL_ERROR: Final = error_response(500, "internal server error")
# Stands for the request a refusal answers: it may not have been read whole.
_UNREAD: Final = Request("GET", b"/", [], b"", "1.1", False)
_METHOD_NAMES: Final = {
    name.encode("ascii"): name
    for name in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
}


class _Refused(Exception):
    """Raised in a parser callback to stop parsing: the request is refused with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Resume:
    """Runs a coroutine, already started by hand, to its end inside a task: what it waits on
    goes to the task, and what the task sends or throws goes back to it, as ``await`` would."""

    def __init__(self, coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, waiting_on = self._coroutine, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:  # CancelledError included: the coroutine decides
                try:
                    waiting_on = coroutine.throw(error)
                except StopIteration as finished:
                    return finished.value
            else:
                try:
                    waiting_on = coroutine.send(sent)
                except StopIteration as finished:
                    return finished.value


async def _finish(coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    return await _Resume(coroutine, waiting_on)


class HttpServer:
    """The listening sockets and every open connection; the clock they share."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.heads = ResponseHeads()
        # The immediate route (see ``answer_immediately``): its path prefix, the head of its
        # answers and where their bodies come from.
        self.immediate_prefix: bytes | None = None
        self.immediate_head = b""
        self.body_at: BodyAt | None = None
        self.connections: set[HttpConnection] = set()
        self.stopping = False
        # Loop time and the Date field, refreshed once a second by the tick.
        self.now = 0.0
        self.date = http_date(time.time())
        self._listeners: list[asyncio.Server] = []
        self._tick_handle: asyncio.TimerHandle | None = None
        self._all_closed = asyncio.Event()

    def answer_immediately(self, prefix: str, head: Response, body_at: BodyAt) -> None:
        """Answer ``GET prefix<segment>`` with ``head``'s status and header fields and the body
        ``body_at(segment)``, when that is not None: no request object, no routing, no
        coroutine, no response object, the head serialized once. Only for a segment of
        unreserved characters (the same once decoded) and an HTTP/1.x request; ``prefix``
        must be a route's that no earlier route shadows. Set before the server listens."""
        self.immediate_prefix = prefix.encode("utf-8")
        self.immediate_head = self.heads.head(head)
        self.body_at = body_at

    def forget(self, connection: HttpConnection) -> None:
        """A connection closed."""
        self.connections.discard(connection)
        if self.stopping and not self.connections:
            self._all_closed.set()

    def _connection(self) -> HttpConnection:
        return HttpConnection(self)

    async def listen_tcp(
        self, host: str | None, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Accept connections on ``host:port``."""
        loop = asyncio.get_running_loop()
        self._start_ticking(loop)
        listener = await loop.create_server(
            self._connection, host, port, ssl=ssl_context, reuse_address=True
        )
        self._listeners.append(listener)

    async def listen_unix(self, path: str, ssl_context: ssl.SSLContext | None = None) -> None:
        """Accept connections on the Unix socket ``path``."""
        loop = asyncio.get_running_loop()
        self._start_ticking(loop)
        listener = await loop.create_unix_server(self._connection, path, ssl=ssl_context)
        self._listeners.append(listener)

    @property
    def sockets(self) -> list[Any]:
        """The listening sockets (to learn the port when 0 was asked for)."""
        return [sock for listener in self._listeners for sock in listener.sockets]

    def _start_ticking(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._tick_handle is None:
            self._tick(loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time()
        wall = time.time()
        self.date = http_date(wall)
        for connection in list(self.connections):
            connection.close_if_idle_since(self.now - KEEPALIVE_TIMEOUT_S)
        # Just after the next whole second, so that Date is never a second behind.
        self._tick_handle = loop.call_later(1.0 - wall % 1.0 + 0.001, self._tick, loop)

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting, let answers under way finish (``grace`` at most), close the rest."""
        self.stopping = True
        for listener in self._listeners:
            listener.close()
        for connection in list(self.connections):
            connection.close_when_answered()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for connection in list(self.connections):
            connection.abort()
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None


class HttpConnection(asyncio.Protocol):
    """One client connection: parses its requests and writes their answers in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.respond = server.respond
        self.heads = server.heads
        self.immediate_prefix = server.immediate_prefix
        self.immediate_head = server.immediate_head
        self.body_at = server.body_at
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # Waiting for a request head since this loop time (None: a head is complete and its
        # answer is under way).
        self.waiting_since: float | None = server.now
        self.head_size = 0
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        # The request has a Connection field: its HTTP version has to be asked for.
        self.connection_field = False
        self.body: list[bytes] | None = None
        self.body_size = 0
        self.refused: _Refused | None = None
        # A task computes an answer; requests read meanwhile wait in ``queue``.
        self.busy = False
        self.queue: deque[Request | Response] = deque()
        # No further request is read: the connection closes after the answers owed.
        self.closing = False
        self.close_after_answer = False
        self.write_paused = False
        self.reading_paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.waiting_since = self.server.now

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.closing = True
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.waiting_since is not None:
            self.head_size += len(data)
            if self.head_size > MAX_HEAD_SIZE:
                self._refuse(_Refused(431, "the request head is too large"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request was answered; what follows it is another protocol, not spoken here.
            self.closing = True
            self._close_when_done()
        except httptools.HttpParserError as error:
            refused, self.refused = self.refused, None
            self._refuse(refused or _Refused(400, str(error) or "malformed request"))

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_LINE_SIZE:
            self._stop_parsing(414, f"the request target is longer than {MAX_LINE_SIZE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        if size + len(value) > MAX_FIELD_SIZE:
            self._stop_parsing(431, f"a header field is longer than {MAX_FIELD_SIZE} bytes")
        if size == 10 and name.lower() == b"connection":
            self.connection_field = True
        self.raw_headers.append((name, value))
        if len(self.raw_headers) > MAX_HEADERS:
            self._stop_parsing(431, f"more than {MAX_HEADERS} header fields")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_BODY_SIZE:
            self._stop_parsing(413, f"the request body is larger than {MAX_BODY_SIZE} bytes")
        if self.body is None:
            self.body = [body]
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.closing:
            return  # read behind an answer that closes the connection: never answered
        # Done here rather than in on_message_begin / on_headers_complete: each callback the
        # parser makes costs, and a request without a body is complete with its head.
        self.waiting_since = None
        self.head_size = 0
        parser = self.parser
        url = self.url
        prefix = self.immediate_prefix
        if (
            prefix is not None
            and url.startswith(prefix)
            and not self.busy
            and not self.queue
            and self.body is None
            and parser.get_method() == b"GET"
            and self._answered_immediately(url[len(prefix) :])
        ):
            return
        version = parser.get_http_version()
        if version not in _VERSIONS:
            self._stop_parsing(400, f"HTTP/{version} is not served")
        body = self.body
        method = parser.get_method()
        request = Request(
            _METHOD_NAMES.get(method) or method.decode("ascii"),
            url,
            self.raw_headers,
            b"".join(body) if body else b"",
            version,
            parser.should_keep_alive(),
        )
        self.url = b""
        self.raw_headers = []
        self.connection_field = False
        if body is not None:
            self.body = None
            self.body_size = 0
        if self.busy or self.queue:
            self.queue.append(request)
            self._update_reading()
        else:
            self._answer(request)

    # answering

    def _answered_immediately(self, segment: bytes) -> bool:
        """Answer a GET of the immediate route from its last path ``segment`` if it is plain
        and the route has a body for it; False leaves the request to the usual way."""
        # Only unreserved characters: the segment is the same once decoded, and it is the
        # whole rest of the path (no '/', query or fragment).
        if not segment or segment.translate(None, _UNRESERVED):
            return False
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        # llhttp parses HTTP/0.9, 1.0, 1.1 and 2.0, and keeps 1.1 alive unless told to close,
        # the others only when told to: alive with no Connection field is HTTP/1.1, and the
        # version string, costly to make, is asked for only otherwise.
        if not keep_alive or self.connection_field:
            version = parser.get_http_version()
            if version not in _VERSIONS:
                return False  # refused the usual way
        else:
            version = "1.1"
        try:
            body = self.body_at(segment.decode("ascii"))  # type: ignore[misc]
        except Exception:
            # The usual way answers it again, and reports its own failure.
            log.exception("error answering GET %s", self.url.decode("ascii"))
            return False
        if body is None:
            return False
        self.url = b""
        self.raw_headers.clear()  # never handed to a request: nobody else holds it
        self.connection_field = False
        self._write(
            self.immediate_head,
            len(body),
            body,
            keep_alive and not self.close_after_answer,
            version,
        )
        return True

    def _stop_parsing(self, status: int, message: str) -> None:
        self.refused = _Refused(status, message)
        raise self.refused

    def _refuse(self, refused: _Refused) -> None:
        """Answer ``refused`` after the answers owed, and close."""
        log.info("refused a malformed HTTP request: %s", refused.message)
        self.closing = True
        response = error_response(refused.status, refused.message)
        if self.busy or self.queue:
            self.queue.append(response)
        else:
            self._send(_UNREAD, response)

    def _answer(self, request: Request) -> None:
        try:
            answer = self.respond(request)
            if answer.__class__ is not Response:
                try:
                    waiting_on = answer.send(None)  # type: ignore[union-attr]
                except StopIteration as finished:
                    answer = finished.value
                else:
                    self.busy = True
                    task = asyncio.get_running_loop().create_task(
                        _finish(answer, waiting_on)  # type: ignore[arg-type]
                    )
                    task.add_done_callback(lambda done: self._answered_later(request, done))
                    return
        except Exception:
            log.exception("error answering %s %s", request.method, request.path)
            answer = _INTERNAL_ERROR
        self._send(request, answer)

    def _answered_later(self, request: Request, task: asyncio.Task[Any]) -> None:
        self.busy = False
        if task.cancelled():
            answer: Any = error_response(503, "the service is stopping")
        elif (error := task.exception()) is not None:
            log.error("error answering %s %s", request.method, request.path, exc_info=error)
            answer = _INTERNAL_ERROR
        else:
            answer = task.result()
        if self.transport is None or self.transport.is_closing():
            return
        self._send(request, answer)
        while self.queue and not self.busy:
            waiting = self.queue.popleft()
            if isinstance(waiting, Response):
                self._send(_UNREAD, waiting)
            else:
                self._answer(waiting)
        self._update_reading()

    def _send(self, request: Request, response: Any) -> None:
        if response.__class__ is not Response:
            log.error(
                "%s %s answered %r, not a response of the fast web driver",
                request.method,
                request.path,
                response,
            )
            response = _INTERNAL_ERROR
        try:
            head = self.heads.head(response)
        except ValueError:
            log.exception("%s %s: an answer HTTP cannot carry", request.method, request.path)
            response = _INTERNAL_ERROR
            head = self.heads.head(response)
        keep_alive = request.keep_alive and not self.close_after_answer and not self.closing
        body = response._body
        if response._status in _NO_BODY_STATUSES or response._status < 200:
            self._write(head, None, b"", keep_alive, request.version)
        elif request.method == "HEAD":
            self._write(head, len(body), b"", keep_alive, request.version)
        else:
            self._write(head, len(body), body, keep_alive, request.version)

    def _write(
        self, head: bytes, length: int | None, body: bytes, keep_alive: bool, version: str
    ) -> None:
        """Write one answer: ``head``, ``Content-Length: length`` (none when None), ``Date``,
        the Connection field ``keep_alive`` and ``version`` call for, and ``body``; the
        connection closes after it unless kept alive."""
        if not keep_alive:
            connection = b"Connection: close\r\n"
        elif version == "1.1":
            connection = b""
        else:
            connection = b"Connection: keep-alive\r\n"
        server = self.server
        if length is None:
            data = b"%s%s%s\r\n" % (head, server.date, connection)
        else:
            data = b"%sContent-Length: %d\r\n%s%s\r\n%s" % (
                head,
                length,
                server.date,
                connection,
                body,
            )
        # Written at once, also for pipelined requests: uvloop sends what it can right away
        # and buffers the rest, so answers go out in the order they are written.
        self.transport.write(data)  # type: ignore[union-attr]
        if not keep_alive:
            self.closing = True
            self.queue.clear()
            self._close_when_done()
        elif not self.busy and not self.queue:
            self.waiting_since = server.now

    def _close_when_done(self) -> None:
        """Close once what is written is sent (at once if nothing is owed any more)."""
        if self.transport is None or self.busy or self.queue:
            return
        self.transport.close()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self.write_paused or len(self.queue) >= PIPELINE_DEPTH
        if pause and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True
        elif not pause and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    # the server's calls

    def close_if_idle_since(self, moment: float) -> None:
        """Close the connection if it has waited for a request head since before ``moment``."""
        waiting_since = self.waiting_since
        if waiting_since is None or waiting_since > moment or self.transport is None:
            return
        self.closing = True
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that reads nothing would hold it open
        else:
            self.transport.close()

    def close_when_answered(self) -> None:
        """The server stops: answer what is under way with ``Connection: close``, then close;
        close at once when nothing is."""
        self.close_after_answer = True
        if not self.busy:
            self.closing = True
            self.queue.clear()
            self._close_when_done()

    def abort(self) -> None:
        """Cut the connection, whatever is under way."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
