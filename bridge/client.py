"""The bridge's NATS connection: nats-py's client, with the one header every order carries read
without the general parser.

nats-py parses the header block of every message it receives into a dict, line by line
(``Client._parse_header_lines``): about 4-7 % of the worker's CPU while ingesting
(bench/findings.md), for a block that on an order is always the same single line, the
publisher's ``Nats-Msg-Id`` (publisher/publish.py; JetStream's deduplication key). That block is
read here directly, into the same dict nats-py would make; every other block (status messages
that end a pull request, several headers, anything unusual) goes to nats-py's own parser.
"""

from __future__ import annotations

from typing import Final

from nats.aio.client import Client

_MSG_ID_BLOCK_START: Final = b"NATS/1.0\r\nNats-Msg-Id:"
_BLOCK_END: Final = b"\r\n\r\n"
_LINE_END: Final = b"\r\n"
_MSG_ID: Final = "Nats-Msg-Id"


class BridgeClient(Client):
    """``nats.aio.client.Client``, whose header parsing knows the orders' one header."""

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        # Client._process_msg calls this for every message with its raw header block.
        if (
            headers
            and headers.startswith(_MSG_ID_BLOCK_START)
            and headers.endswith(_BLOCK_END)
            and headers.count(_LINE_END) == 3
        ):
            value = headers[len(_MSG_ID_BLOCK_START) : -len(_BLOCK_END)]
            return {_MSG_ID: value.strip().decode("utf-8", "replace")}
        parsed: dict[str, str] | None = await super()._process_headers(headers)
        return parsed
