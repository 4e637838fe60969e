"""Waiting for what a running worker does with the orders sent to it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tests.database import InspectedStore
from tests.worker import Worker, eventually, view_size


async def wait_for_orders(worker: Worker, count: int) -> None:
    """Until the worker's view holds ``count`` orders."""

    async def holds_all() -> bool:
        return await view_size(worker) == count

    await eventually(holds_all, f"{count} orders in the view", context=worker.log_tail)


def logged(worker: Worker, text: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return text in worker.log()

    return check


async def event_uids(store: InspectedStore) -> list[str]:
    return [str(uid) for (uid,) in await store.fetch("SELECT order_uid FROM orders_events")]
