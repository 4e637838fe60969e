"""A Faust web driver on httptools and the running event loop (uvloop in the service), for
reads at several times the rate of Faust's aiohttp driver on one core.

The routes are the ones registered through Faust's API (``app.page``, blueprints,
``Web.add_view``); the views are Faust views, answered through their ``dispatch`` as on the
aiohttp driver, with this driver's :class:`~streams.http_message.Request` and
:class:`~streams.http_message.Response`. What makes it fast is in what it leaves out per
request: no routing tree walked (a dictionary look-up, or a prefix test for a route ending in a
placeholder), no header mapping built unless a view reads it, no task for a view that answers
without waiting, a response head serialized once and reused (:mod:`streams.http_protocol`).
A view that can answer a GET from its last path segment alone (:class:`ImmediateGet`, as
``/orders/{uid}`` does) is answered with no request, coroutine or response object at all.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable, Coroutine, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from faust.types import AppT
from faust.types.web import ResourceOptions
from faust.utils import json as faust_json
from faust.web import View, base
from mode import Service

from streams.http_message import Request, Response
from streams.http_protocol import HttpServer, error_response
from streams.http_router import Route, Router

_bytes = bytes  # the driver has a method named ``bytes``

Handler = Callable[[Request], Coroutine[Any, Any, Any]]

_NOT_FOUND: Final = error_response(404, "not found")


@runtime_checkable
class ImmediateGet(Protocol):
    """A view that can answer a GET of its route from the last path segment alone, at once:
    the fast driver then calls it without a request, a coroutine or a response object (see
    ``HttpServer.answer_immediately``), for a route that ends in its only placeholder and
    comes first. Everything it does not answer that way goes to its ``dispatch``."""

    def immediate_response(self) -> base.Response:
        """The status and header fields of every immediate answer (its body is not sent)."""
        ...

    def immediate_body(self, segment: str) -> _bytes | None:
        """The body of the answer for ``segment``, or None: answered through ``dispatch``."""
        ...


class _Server(Service):
    """The listening server as a mode service, so that it starts and stops with the app."""

    def __init__(self, web: Web, **kwargs: Any) -> None:
        self.web = web
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.web.start_server()

    async def on_stop(self) -> None:
        await self.web.stop_server()


class Web(base.Web):
    """Faust's web driver interface on :class:`~streams.http_protocol.HttpServer`."""

    driver_version = "fast-httptools"

    def __init__(self, app: AppT, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.router: Router[Handler] = Router()
        self.server = HttpServer(self.respond)
        self._not_allowed: dict[str, Response] = {}

    async def on_start(self) -> None:
        if self.app.conf.web_in_thread:
            raise RuntimeError("the fast web driver serves on the app's loop, not in a thread")
        self.init_server()
        self.add_dependency(_Server(self, loop=self.loop, beacon=self.beacon))

    async def start_server(self) -> None:
        """Listen where Faust's ``web_transport`` says (TCP or a Unix socket)."""
        conf = self.app.conf
        transport = conf.web_transport
        if transport.scheme == "unix":
            await self.server.listen_unix(transport.path, conf.web_ssl_context)
        else:
            await self.server.listen_tcp(conf.web_bind, conf.web_port, conf.web_ssl_context)

    async def stop_server(self) -> None:
        """Stop listening and finish the answers under way (see ``HttpServer.stop``)."""
        await self.server.stop()

    async def wsgi(self) -> Any:
        raise NotImplementedError("the fast web driver is its own server; it has no WSGI app")

    # answering

    def respond(self, request: Request) -> Response | Coroutine[Any, Any, Any]:
        """The answer to ``request``: the matching route's handler's, or 404 / 405."""
        found = self.router.resolve(request.path)
        if found is None:
            return _NOT_FOUND
        route, request.match_info = found
        handler = route.handlers.get(request.method)
        if handler is None:
            return self._method_not_allowed(route)
        return handler(request)

    def _method_not_allowed(self, route: Route[Handler]) -> Response:
        response = self._not_allowed.get(route.pattern)
        if response is None:
            response = self._not_allowed[route.pattern] = error_response(
                405, "method not allowed", {"Allow": route.allow}
            )
        return response

    # routes

    def route(
        self,
        pattern: str,
        handler: Callable[..., Any],
        cors_options: Mapping[str, ResourceOptions] | None = None,
    ) -> None:
        """Route ``pattern`` to a view (its methods) or to a bare ``async`` handler (GET and
        HEAD). CORS is not done by this driver: it refuses to start with CORS options."""
        if cors_options or self.app.conf.web_cors_options:
            raise RuntimeError("the fast web driver does no CORS; use ORDERS_WEB_DRIVER=aiohttp")
        if isinstance(handler, View):
            # The view's own dispatch, without View.__call__'s extra coroutine around it.
            self.router.add(pattern, handler.get_methods(), handler.dispatch)
            prefix = self.router.first_route_prefix(pattern)
            if (
                isinstance(handler, ImmediateGet)
                and prefix is not None
                and "GET" in handler.get_methods()
            ):
                head = handler.immediate_response()
                if not isinstance(head, Response):
                    raise TypeError(
                        f"{pattern}: immediate_response() must be made by the view's own"
                        f" response methods (self.bytes, self.json...), not {type(head)!r}"
                    )
                self.server.answer_immediately(prefix, head, handler.immediate_body)
        else:
            self.router.add(pattern, {"GET", "HEAD"}, handler)

    def add_static(self, prefix: str, path: Path | str, **kwargs: Any) -> None:
        """Serve the files under ``path`` at ``prefix``/<relative path>, never outside it."""
        root = Path(path).resolve()
        base_path = "/" + prefix.strip("/")

        async def static(request: Request) -> Response:
            relative = request.path[len(base_path) :].lstrip("/")
            target = (root / relative).resolve()
            if not target.is_relative_to(root) or not target.is_file():
                return _NOT_FOUND
            content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            return Response(target.read_bytes(), content_type=content_type)

        self.router.add_subtree(base_path.rstrip("/") + "/", {"GET", "HEAD"}, static)

    async def read_request_content(self, request: base.Request) -> _bytes:
        assert isinstance(request, Request)
        return await request.read()

    # responses, as Faust's aiohttp driver makes them

    def text(
        self,
        value: str,
        *,
        content_type: str | None = None,
        status: int = 200,
        reason: str | None = None,
        headers: MutableMapping[str, str] | None = None,
    ) -> base.Response:
        return Response(
            value.encode("utf-8"),
            status=status,
            content_type=_with_charset(content_type or "text/plain"),
            reason=reason,
            headers=headers,
        )

    def html(
        self,
        value: str,
        *,
        content_type: str | None = None,
        status: int = 200,
        reason: str | None = None,
        headers: MutableMapping[str, str] | None = None,
    ) -> base.Response:
        return self.text(
            value,
            content_type=content_type or "text/html",
            status=status,
            reason=reason,
            headers=headers,
        )

    def json(
        self,
        value: Any,
        *,
        content_type: str | None = None,
        status: int = 200,
        reason: str | None = None,
        headers: MutableMapping[str, str] | None = None,
    ) -> base.Response:
        payload: Any = faust_json.dumps(value)
        return Response(
            payload if isinstance(payload, _bytes) else payload.encode("utf-8"),
            status=status,
            content_type=_with_charset(content_type or "application/json"),
            reason=reason,
            headers=headers,
        )

    def bytes(
        self,
        value: _bytes,
        *,
        content_type: str | None = None,
        status: int = 200,
        reason: str | None = None,
        headers: MutableMapping[str, str] | None = None,
    ) -> base.Response:
        return Response(
            value, status=status, content_type=content_type, reason=reason, headers=headers
        )

    def bytes_to_response(self, s: _bytes) -> base.Response:
        status, headers, body = self._bytes_to_response(s)
        return Response(body, status=status, headers=dict(headers))

    def response_to_bytes(self, response: base.Response) -> _bytes:
        assert isinstance(response, Response)
        fields = dict(response.header_fields)
        content_type = response.content_type_field
        if content_type is not None:
            fields = {
                **{k: v for k, v in fields.items() if k.lower() != "content-type"},
                "Content-Type": content_type,
            }
        return self._response_to_bytes(response.status, fields, response.body)


def _with_charset(content_type: str) -> str:
    # As aiohttp's Response(text=...): a text body is sent as UTF-8 and says so.
    return content_type if "charset=" in content_type else f"{content_type}; charset=utf-8"
