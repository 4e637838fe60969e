"""The look-up page in a real headless Chromium, against a real worker.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` Python package;
Playwright's own browser downloads are never used. Running it refreshes ``docs/page.png``.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote, urlsplit

import orjson
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    Route,
    async_playwright,
    expect,
)

from streams.store import PostgresEventStore
from streams.validation import Accepted, validate
from tests.database import DatabaseSwitch
from tests.harness import worker_env
from tests.orders import MODEL, new_uid, order_dict
from tests.worker import Worker

CHROMIUM: Final = Path("/usr/bin/chromium")
# No network here: without these Chromium waits on connections to Google's services.
CHROMIUM_ARGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT: Final = Path(__file__).resolve().parent.parent / "docs" / "page.png"

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Chromium not installed: apt-get install chromium"
    ),
    pytest.mark.usefixtures("web_driver"),
]

NOT_READY: Final = "The service is still loading orders, try again in a moment."


class Serve(Protocol):
    async def __call__(self, *orders: dict[str, Any]) -> Worker: ...


class OpenPage(Protocol):
    async def __call__(self, *, width: int = 1100, bypass_csp: bool = False) -> Page: ...


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Opens tabs in fresh contexts (en-US, UTC, so dates and numbers read the same anywhere);
    fails the test if the page threw or the Content-Security-Policy refused anything."""
    contexts: list[BrowserContext] = []
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.append(message.text)

    async def open_(*, width: int = 1100, bypass_csp: bool = False) -> Page:
        context = await browser.new_context(
            locale="en-US",
            timezone_id="UTC",
            viewport={"width": width, "height": 900},
            bypass_csp=bypass_csp,
        )
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        page.on("console", on_console)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert not problems, problems


@pytest.fixture
async def serve(
    tmp_path: Path, database_url: str, nats_url: str, store: PostgresEventStore
) -> AsyncIterator[Serve]:
    """Starts the real service with ``orders`` already in its log (the view is restored from
    the log at boot) and waits until it is ready."""
    with ExitStack() as running:

        async def start(*orders: dict[str, Any]) -> Worker:
            await store.write_batch([accepted(order) for order in orders], [])
            worker = running.enter_context(Worker(tmp_path, **worker_env(database_url, nats_url)))
            await worker.wait_ready()
            return worker

        yield start


def accepted(order: dict[str, Any]) -> Accepted:
    """The order as the agent would store it; it must pass validation like a published one."""
    checked = validate(orjson.dumps(order))
    assert isinstance(checked, Accepted), checked
    return checked


def item(**changes: Any) -> dict[str, Any]:
    """The model's item with some fields changed."""
    made: dict[str, Any] = {**copy.deepcopy(MODEL["items"][0]), **changes}
    return made


def three_item_order(uid: str) -> dict[str, Any]:
    """A consistent order: goods_total is the sum of the items' total_price."""
    items = [
        item(),
        item(
            chrt_id=9934931,
            rid="7e1c2a3b4d5e6f70test",
            name="Matte Lip Crayon",
            brand="Maybelline",
            price=620,
            sale=15,
            total_price=527,
            nm_id=2389213,
        ),
        item(
            chrt_id=9934932,
            rid="5b6c7d8e9fa0b1c2test",
            name="Cotton T-shirt",
            brand="Befree",
            size="M",
            price=1290,
            sale=40,
            total_price=774,
            nm_id=2389214,
        ),
    ]
    goods = sum(entry["total_price"] for entry in items)
    order = order_dict(uid, items=items)
    order["payment"].update(goods_total=goods, amount=goods + order["payment"]["delivery_cost"])
    return order


async def search(page: Page, uid: str, *, click: bool = False) -> None:
    field = page.get_by_label("Order UID")
    await field.fill(uid)
    if click:
        await page.get_by_role("button", name="Search").click()
    else:
        await field.press("Enter")


async def expect_order(page: Page, order: dict[str, Any]) -> None:
    """The order is shown: its uid, one table row per item and the sum of total_price."""
    currency = order["payment"]["currency"]
    total = sum(entry["total_price"] for entry in order["items"])
    await expect(page.locator("#order-uid")).to_have_text(order["order_uid"])
    await expect(page.locator("#items tbody tr")).to_have_count(len(order["items"]))
    await expect(page.locator("#items-total")).to_have_text(f"{total:,} {currency}")
    await expect(page.locator("#status")).to_be_hidden()


async def test_search_with_enter_shows_the_order_as_a_person_reads_it(
    serve: Serve, open_page: OpenPage
) -> None:
    order = three_item_order("b563feb7b2b84b6test")
    worker = await serve(order)
    page = await open_page()
    await page.goto(worker.base + "/")
    await expect(page.locator("main")).to_have_css("max-width", "1024px")  # app.css applies

    await search(page, order["order_uid"])

    await expect_order(page, order)
    assert urlsplit(page.url).query == "uid=" + order["order_uid"]
    rows = page.locator("#items tbody tr")
    await expect(rows.nth(2).locator("td")).to_have_text(
        ["Cotton T-shirt", "Befree", "M", "1,290", "40 %", "774", "202"]
    )
    await expect(page.locator("#delivery")).to_contain_text(order["delivery"]["address"])
    await expect(page.locator("#payment")).to_contain_text("3,118 USD")
    await expect(page.locator("#payment time")).to_have_attribute(
        "datetime", "2021-11-26T06:22:07.000Z"
    )
    await expect(page.locator("#summary time")).to_have_text("Nov 26, 2021, 06:22 AM UTC")
    await page.screenshot(path=SCREENSHOT, full_page=True)

    await expect(page.locator("#json")).to_be_hidden()
    await page.get_by_text("Raw JSON").click()
    assert orjson.loads(await page.locator("#json").inner_text()) == order


async def test_raw_json_can_be_copied_or_at_least_selected(
    serve: Serve, open_page: OpenPage
) -> None:
    order = order_dict()
    worker = await serve(order)
    page = await open_page()
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await page.goto(f"{worker.base}/?uid={order['order_uid']}")
    await page.get_by_text("Raw JSON").click()
    await page.get_by_role("button", name="Copy JSON").click()
    await expect(page.locator("#copy-status")).to_have_text("Copied.")
    assert orjson.loads(await page.evaluate("navigator.clipboard.readText()")) == order

    # Without the Clipboard API (plain http on another host) the JSON is selected instead.
    await page.evaluate("Object.defineProperty(navigator, 'clipboard', {value: undefined})")
    await page.get_by_role("button", name="Copy JSON").click()
    await expect(page.locator("#copy-status")).to_contain_text("press Ctrl+C")
    assert orjson.loads(await page.evaluate("getSelection().toString()")) == order


async def test_search_button_shows_the_order(serve: Serve, open_page: OpenPage) -> None:
    order = order_dict()
    worker = await serve(order)
    page = await open_page()
    await page.goto(worker.base + "/")
    await search(page, order["order_uid"], click=True)
    await expect_order(page, order)


async def test_a_missing_order_is_reported_as_not_found(serve: Serve, open_page: OpenPage) -> None:
    worker = await serve(order_dict())
    page = await open_page()
    await page.goto(worker.base + "/")
    await search(page, "nosuchorder")
    await expect(page.locator("#status")).to_have_text("Order nosuchorder not found.")
    await expect(page.locator("#order")).to_be_hidden()


@pytest.mark.parametrize("how", ["typed", "deep link"])
@pytest.mark.parametrize("malformed", ["no spaces", "<b>x</b>", "x" * 65, "été"])
async def test_a_malformed_uid_is_refused_without_asking_the_service(
    serve: Serve, open_page: OpenPage, how: str, malformed: str
) -> None:
    order = order_dict()
    worker = await serve(order)
    page = await open_page()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(urlsplit(request.url).path))
    if how == "typed":
        await page.goto(worker.base + "/")
        await search(page, malformed)
    else:
        await page.goto(f"{worker.base}/?uid={quote(malformed)}")
    await expect(page.locator("#status")).to_have_text(
        f"“{malformed}” is not a valid order_uid: use 1 to 64 letters, digits, '_' or '-'."
    )
    # A request the malformed search had made would be seen before this one's answer.
    await search(page, order["order_uid"])
    await expect_order(page, order)
    assert [path for path in asked if path.startswith("/orders")] == [
        "/orders/" + order["order_uid"]
    ]


async def test_a_deep_link_opens_the_order(serve: Serve, open_page: OpenPage) -> None:
    order = three_item_order(new_uid())
    worker = await serve(order)
    page = await open_page()
    await page.goto(f"{worker.base}/?uid={order['order_uid']}")
    await expect_order(page, order)
    await expect(page.get_by_label("Order UID")).to_have_value(order["order_uid"])


async def test_markup_in_order_data_is_shown_as_text_and_never_run(
    serve: Serve, open_page: OpenPage
) -> None:
    name = '<img src=x onerror="window.__pwned=1">'
    brand = "<script>window.__pwned=2</script>"
    address = "</td><b>bold</b>"
    order = order_dict(
        items=[item(name=name, brand=brand)],
        delivery={**MODEL["delivery"], "address": address},
        customer_id='"><svg onload="window.__pwned=3">',
    )
    worker = await serve(order)
    # Without the policy, so that this tests the page's own code and not the CSP behind it.
    page = await open_page(bypass_csp=True)
    await page.goto(f"{worker.base}/?uid={order['order_uid']}")
    await expect_order(page, order)
    for text in (name, brand, address, order["customer_id"]):
        await expect(page.get_by_text(text, exact=True)).to_be_visible()
    assert await page.evaluate("window.__pwned") is None
    await expect(page.locator("img, svg, b")).to_have_count(0)
    await expect(page.locator("script")).to_have_count(1)  # app.js


async def test_a_miss_while_the_view_is_restored_says_to_try_again(
    tmp_path: Path,
    database_url: str,
    nats_url: str,
    database_switch: DatabaseSwitch,
    store: PostgresEventStore,
    open_page: OpenPage,
) -> None:
    """The worker cannot reach its database, so its view stays unrestored (readyz 503)."""
    order = order_dict()
    await store.write_batch([accepted(order)], [])
    database_switch.refuse()
    with Worker(tmp_path, **worker_env(database_url, nats_url)) as worker:
        await worker.wait_alive()
        page = await open_page()
        await page.goto(f"{worker.base}/?uid={order['order_uid']}")
        await expect(page.locator("#status")).to_have_text(NOT_READY)


async def test_an_unreachable_service_is_reported(serve: Serve, open_page: OpenPage) -> None:
    order = order_dict()
    worker = await serve(order)
    page = await open_page()
    await page.goto(worker.base + "/")
    worker.kill()
    await search(page, order["order_uid"])
    await expect(page.locator("#status")).to_have_text(
        "The service cannot be reached. Check that it is running and try again."
    )


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            400,
            {"error": "malformed order_uid: expected 1 to 64 letters", "status": 400},
            "The service refused “abc”: malformed order_uid: expected 1 to 64 letters.",
        ),
        (503, {"status": "restoring"}, NOT_READY),
        (500, {"error": "boom", "status": 500}, "The service answered 500: boom"),
        (502, "<html>Bad Gateway</html>", "The service answered 502."),
    ],
)
async def test_other_answers_of_the_service_are_explained(
    serve: Serve, open_page: OpenPage, status: int, body: object, message: str
) -> None:
    """Answers the service gives only in other versions or behind a proxy, stubbed in the
    browser."""
    worker = await serve(order_dict())
    page = await open_page()

    async def answer(route: Route, request: Request) -> None:
        text = body if isinstance(body, str) else orjson.dumps(body).decode()
        await route.fulfill(status=status, body=text, content_type="application/json")

    await page.route("**/orders/*", answer)
    await page.goto(worker.base + "/")
    await search(page, "abc")
    await expect(page.locator("#status")).to_have_text(message)


async def test_the_page_fits_a_phone(serve: Serve, open_page: OpenPage) -> None:
    order = three_item_order(new_uid())
    worker = await serve(order)
    page = await open_page(width=375)
    await page.goto(f"{worker.base}/?uid={order['order_uid']}")
    await expect_order(page, order)
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow == 0, "the page scrolls sideways on a phone"
