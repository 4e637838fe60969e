"""What the HTTP port allows a client, and the headers of the server's own refusals, the same
whichever web driver serves it.

The sizes are aiohttp's own defaults, written down so that the fast driver refuses exactly what
the aiohttp driver refuses; the timeout is the service's (aiohttp's default was an hour).
"""

from __future__ import annotations

from typing import Final

# A connection that carries no complete request head for this long is closed: the bound on the
# wait for the first request head, on a head trickling in (slowloris), and on the idle time of a
# kept-alive connection between an answer and the next request.
KEEPALIVE_TIMEOUT_S: Final = 10.0
# The request line (method, target, version): longer is answered 414 by the fast driver.
MAX_LINE_SIZE: Final = 8190
# One header field, name and value: longer is answered 431.
MAX_FIELD_SIZE: Final = 8190
# Header fields in one request: more is answered 431.
MAX_HEADERS: Final = 128
# A request body the service would read (no route takes one): larger is answered 413.
MAX_BODY_SIZE: Final = 1024**2
# How long a stopping server lets answers already under way finish before it cuts them.
SHUTDOWN_GRACE_S: Final = 10.0
# The server's own answers (no route, no such method, refusals, failures) are data too:
# nothing in them may be run, sniffed or framed, as for every answer of the service's views.
REFUSAL_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
