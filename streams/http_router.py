"""Which handler answers a request path: the fast web driver's routing table.

Patterns are Faust's (aiohttp's) route syntax: literal segments and ``{name}`` segments, each
of which matches one non-empty path segment; ``{name:regex}`` takes a regular expression for
the segment. The first route registered that matches a path answers it, as in aiohttp.

A request path is matched in one dictionary look-up when it is a literal route's, and a
pattern whose only placeholder is its last segment (``/orders/{uid}``) is matched with a
prefix test; anything else is matched segment by segment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

H = TypeVar("H")

_NOTHING: Final[Mapping[str, str]] = {}
_PLACEHOLDER: Final = re.compile(r"^\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<regex>.+))?\}$")


@dataclass
class Route(Generic[H]):
    """One path pattern and its handler for each method it takes."""

    pattern: str
    order: int
    handlers: dict[str, H] = field(default_factory=dict)

    @property
    def allow(self) -> str:
        """The ``Allow`` header field's value: the methods this route takes."""
        return ", ".join(sorted(self.handlers))


class _Matcher(Generic[H]):
    def __init__(self, route: Route[H]) -> None:
        self.route = route

    def match(self, path: str) -> Mapping[str, str] | None:
        raise NotImplementedError


class _LastSegment(_Matcher[H]):
    """``/literal/.../{name}``: the path starts with the prefix and has one segment after it."""

    def __init__(self, route: Route[H], prefix: str, name: str) -> None:
        super().__init__(route)
        self.prefix = prefix
        self.start = len(prefix)
        self.name = name

    def match(self, path: str) -> Mapping[str, str] | None:
        start = self.start
        if len(path) > start and path.startswith(self.prefix) and path.find("/", start) < 0:
            return {self.name: path[start:]}
        return None


class _Subtree(_Matcher[H]):
    """Every path under a prefix (static files): nothing captured."""

    def __init__(self, route: Route[H], prefix: str) -> None:
        super().__init__(route)
        self.prefix = prefix

    def match(self, path: str) -> Mapping[str, str] | None:
        return _NOTHING if path.startswith(self.prefix) else None


class _Segments(_Matcher[H]):
    """Any other pattern: literal segments compared, placeholders captured (with a regex if
    given)."""

    def __init__(self, route: Route[H], parts: list[str | tuple[str, re.Pattern[str] | None]]):
        super().__init__(route)
        self.parts = parts

    def match(self, path: str) -> Mapping[str, str] | None:
        segments = path.split("/")
        if len(segments) != len(self.parts):
            return None
        values: dict[str, str] = {}
        for segment, part in zip(segments, self.parts, strict=True):
            if isinstance(part, str):
                if segment != part:
                    return None
                continue
            name, regex = part
            if not segment or (regex is not None and not regex.fullmatch(segment)):
                return None
            values[name] = segment
        return values


class Router(Generic[H]):
    """Routes in the order they were added; ``resolve`` finds the first that matches."""

    def __init__(self) -> None:
        self._routes: dict[str, Route[H]] = {}
        self._literal: dict[str, Route[H]] = {}
        self._patterns: list[_Matcher[H]] = []
        # The first route added, when it ends in its only placeholder: tested before anything
        # else, inline (no route can come before it), for a hot route such as /orders/{uid}.
        self._first: _LastSegment[H] | None = None

    def add(self, pattern: str, methods: set[str], handler: H) -> None:
        """Have ``handler`` answer ``methods`` on ``pattern`` (a route added again for more
        methods keeps its place)."""
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern {pattern!r} does not start with '/'")
        route = self._routes.get(pattern)
        if route is None:
            route = self._routes[pattern] = Route(pattern, len(self._routes))
            self._index(route)
        for method in methods:
            route.handlers.setdefault(method.upper(), handler)

    def add_subtree(self, prefix: str, methods: set[str], handler: H) -> None:
        """Have ``handler`` answer ``methods`` on every path that starts with ``prefix``."""
        if not prefix.startswith("/"):
            raise ValueError(f"route prefix {prefix!r} does not start with '/'")
        key = prefix + "*"
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = Route(key, len(self._routes))
            self._patterns.append(_Subtree(route, prefix))
        for method in methods:
            route.handlers.setdefault(method.upper(), handler)

    def _index(self, route: Route[H]) -> None:
        parts: list[str | tuple[str, re.Pattern[str] | None]] = []
        for segment in route.pattern.split("/"):
            placeholder = _PLACEHOLDER.match(segment)
            if placeholder is None:
                if "{" in segment or "}" in segment:
                    raise ValueError(
                        f"route pattern {route.pattern!r}: a placeholder must be a whole segment"
                    )
                parts.append(segment)
            else:
                regex = placeholder["regex"]
                parts.append((placeholder["name"], re.compile(regex) if regex else None))
        placeholders = [index for index, part in enumerate(parts) if not isinstance(part, str)]
        if not placeholders:
            self._literal.setdefault(route.pattern, route)
            return
        last = parts[-1]
        if placeholders == [len(parts) - 1] and isinstance(last, tuple) and last[1] is None:
            prefix = route.pattern[: route.pattern.rindex("/") + 1]
            matcher = _LastSegment(route, prefix, last[0])
            self._patterns.append(matcher)
            if route.order == 0:
                self._first = matcher
        else:
            self._patterns.append(_Segments(route, parts))

    def first_route_prefix(self, pattern: str) -> str | None:
        """The literal prefix of ``pattern`` when it is the first route added and ends in its
        only placeholder (no regex): every path that starts with that prefix and has one
        non-empty segment after it is this route's, whatever was added after it."""
        hot = self._first
        return hot.prefix if hot is not None and hot.route.pattern == pattern else None

    def resolve(self, path: str) -> tuple[Route[H], Mapping[str, str]] | None:
        """The first route added whose pattern matches ``path`` (already percent-decoded),
        and the values of its placeholders."""
        hot = self._first
        if hot is not None:
            start = hot.start
            if len(path) > start and path.startswith(hot.prefix) and path.find("/", start) < 0:
                return hot.route, {hot.name: path[start:]}
        literal = self._literal.get(path)
        if literal is None:
            for matcher in self._patterns:
                values = matcher.match(path)
                if values is not None:
                    return matcher.route, values
            return None
        for matcher in self._patterns:
            if matcher.route.order > literal.order:
                break
            values = matcher.match(path)
            if values is not None:
                return matcher.route, values
        return literal, _NOTHING

    def routes(self) -> list[Route[H]]:
        """Every route, in the order added."""
        return list(self._routes.values())
