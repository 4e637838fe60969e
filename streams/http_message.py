"""The fast web driver's request and response, and a response's head as HTTP/1.1 bytes.

Both implement Faust's interfaces (:class:`faust.web.base.Request`, :class:`~faust.web.base.
Response`), so views written for Faust run on them unchanged. They are built for a server that
answers tens of thousands of requests a second on one core: a request keeps its header fields
as the parser gave them and makes a mapping only when asked; a response keeps the header
mapping it was given (copied only if someone asks to change it), and the status line and
header fields of a response are serialized once per distinct combination and reused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

import orjson
from faust.web import base
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy
from yarl import URL

_STATUS_LINES: Final = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii")
    for status in HTTPStatus
}
# Header fields the server writes itself from the response's body and the connection's state;
# a view's own value for them would contradict the framing.
_FRAMING_FIELDS: Final = frozenset(("content-length", "transfer-encoding", "connection", "date"))
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE_FORBIDDEN: Final = re.compile(r"[\r\n\x00]")
# Distinct response heads remembered: a view that puts something new into every response's
# headers (a request id, say) gets its heads serialized each time instead of filling memory.
_HEADS_REMEMBERED: Final = 512

_NO_HEADERS: Final[Mapping[str, str]] = {}


def http_date(seconds: float) -> bytes:
    """The ``Date`` header field (with its line end) for a moment in Unix time."""
    return b"Date: " + formatdate(seconds, usegmt=True).encode("ascii") + b"\r\n"


class Request(base.Request):
    """One HTTP request as parsed, with Faust's request interface on top.

    The target is decoded into ``path`` (percent-escapes resolved, UTF-8, invalid bytes
    replaced) and ``query_string`` at once; headers, query and URL are built when first read.
    """

    # Class-level defaults: nothing to store per request for what no view of the service reads.
    match_info: Mapping[str, str] = _NO_HEADERS  # the router sets the route's values
    user: Any = None
    if_modified_since = None
    if_unmodified_since = None
    if_range = None

    def __init__(
        self,
        method: str,
        target: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes,
        version: str,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.raw_target = target
        self.raw_headers = raw_headers
        self.version = version
        self.keep_alive = keep_alive
        self._body = body
        self._headers: CIMultiDictProxy[str] | None = None
        if b"?" in target or b"%" in target or b"#" in target:
            self.path = _decoded_path(target)
        else:
            self.path = target.decode("utf-8", "replace")

    @property
    def query_string(self) -> str:  # type: ignore[override]
        _, _, query = self.raw_target.partition(b"?")
        return query.partition(b"#")[0].decode("utf-8", "replace")

    @property
    def body_exists(self) -> bool:  # type: ignore[override]
        return bool(self._body)

    @property
    def headers(self) -> CIMultiDictProxy[str]:  # type: ignore[override]
        # Faust declares a plain attribute; a property lets the mapping wait until it is read.
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict(
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in self.raw_headers
                )
            )
        return self._headers

    @property
    def rel_url(self) -> URL:  # type: ignore[override]
        return URL(self.raw_target.decode("utf-8", "replace"), encoded=True)

    @property
    def url(self) -> URL:  # type: ignore[override]
        host = self.headers.get("Host", "localhost")
        return URL(f"http://{host}").join(self.rel_url)

    @property
    def query(self) -> MultiDictProxy[str]:
        return MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))

    @property
    def cookies(self) -> Mapping[str, Any]:
        from http.cookies import SimpleCookie

        jar: SimpleCookie = SimpleCookie(self.headers.get("Cookie", ""))
        return {name: morsel.value for name, morsel in jar.items()}

    def can_read_body(self) -> bool:
        return self.body_exists

    async def read(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return self._body.decode("utf-8")

    async def json(self) -> Any:
        return orjson.loads(self._body)

    async def post(self) -> Mapping[str, str]:
        return dict(parse_qsl(self._body.decode("utf-8"), keep_blank_values=True))


def _decoded_path(target: bytes) -> str:
    """The path of a request target, query cut off, percent-escapes resolved (UTF-8, invalid
    bytes replaced). A fragment is never sent (RFC 9110 4.2.4), but llhttp lets one through."""
    end = target.find(b"?")
    if end < 0:
        end = target.find(b"#")
    path = (target if end < 0 else target[:end]).decode("utf-8", "replace")
    return unquote(path, errors="replace") if "%" in path else path


class Response(base.Response):
    """A complete response: status, header fields and the whole body.

    ``header_fields`` is the mapping the view passed, kept as it is (views share one mapping
    among all their responses); ``headers`` hands out a copy of its own to anyone who may
    change it.
    """

    __slots__ = ("_body", "_content_type", "_headers", "_owns_headers", "_reason", "_status")

    def __init__(
        self,
        body: bytes,
        *,
        status: int = 200,
        content_type: str | None = None,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._status = status
        self._body = body
        self._reason = reason
        self._headers: Mapping[str, str] = headers if headers is not None else _NO_HEADERS
        self._owns_headers = False
        self._content_type = content_type

    @property
    def status(self) -> int:
        return self._status

    @property
    def reason(self) -> str:
        """The reason phrase of the status line."""
        if self._reason is not None:
            return self._reason
        try:
            return HTTPStatus(self._status).phrase
        except ValueError:
            return ""

    @property
    def body(self) -> bytes:
        return self._body

    @property
    def header_fields(self) -> Mapping[str, str]:
        """The header fields as given, not to be changed (they may be shared)."""
        return self._headers

    @property
    def headers(self) -> MutableMapping[str, str]:
        if not self._owns_headers:
            self._headers = CIMultiDict(self._headers)
            self._owns_headers = True
        assert isinstance(self._headers, MutableMapping)
        return self._headers

    @property
    def content_length(self) -> int:
        return len(self._body)

    @property
    def content_type(self) -> str:
        return self.content_type_field or "application/octet-stream"

    @property
    def content_type_field(self) -> str | None:
        """The ``Content-Type`` sent: the one given, else one in the header fields, if any."""
        if self._content_type is not None:
            return self._content_type
        for name, value in self._headers.items():
            if name.lower() == "content-type":
                return value
        return None

    @property
    def charset(self) -> str | None:
        _, _, parameters = self.content_type.partition(";")
        for parameter in parameters.split(";"):
            name, _, value = parameter.strip().partition("=")
            if name.lower() == "charset":
                return value.strip('"')
        return None

    @property
    def chunked(self) -> bool:
        return False

    @property
    def compression(self) -> bool:
        return False

    @property
    def keep_alive(self) -> bool | None:
        return None

    @property
    def body_length(self) -> int:
        return len(self._body)


class ResponseHeads:
    """The status line and header fields of responses, serialized once for each distinct
    (status, reason, content type, header mapping) and reused; without ``Content-Length``,
    ``Date`` and ``Connection``, which the connection adds.

    A header mapping is told apart by its identity, not its contents: views hand the same
    constant mapping to all their responses (as this service's do), and one they change after
    handing it over is read as it was the first time. The heads keep their mappings alive, so
    that no other mapping can take one's identity while it is remembered.
    """

    def __init__(self) -> None:
        self._heads: dict[tuple[object, ...], tuple[bytes, Mapping[str, str]]] = {}

    def head(self, response: Response) -> bytes:
        """The serialized head; ``ValueError`` for a header field HTTP cannot carry."""
        fields = response._headers
        key = (response._status, response._content_type, id(fields), response._reason)
        remembered = self._heads.get(key)
        if remembered is not None:
            return remembered[0]
        head = _serialize_head(response)
        if len(self._heads) < _HEADS_REMEMBERED:
            self._heads[key] = (head, fields)
        return head


def _serialize_head(response: Response) -> bytes:
    status = response._status
    if not 100 <= status <= 999:
        raise ValueError(f"status {status} is not a three-digit HTTP status")
    if response._reason is None and status in _STATUS_LINES:
        lines = [_STATUS_LINES[status]]
    else:
        lines = [f"HTTP/1.1 {status} {_field_value(response.reason)}\r\n".encode("latin-1")]
    content_type = response.content_type_field
    if content_type is None and response._body:
        content_type = "application/octet-stream"
    if content_type is not None:
        lines.append(f"Content-Type: {_field_value(content_type)}\r\n".encode("latin-1"))
    for name, value in response._headers.items():
        lowered = name.lower()
        if lowered in _FRAMING_FIELDS or lowered == "content-type":
            continue
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{name!r} is not a header field name")
        lines.append(f"{name}: {_field_value(str(value))}\r\n".encode("latin-1"))
    return b"".join(lines)


def _field_value(value: str) -> str:
    if _FIELD_VALUE_FORBIDDEN.search(value):
        raise ValueError(f"header field value {value!r} holds a line break or NUL")
    return value
