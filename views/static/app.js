// The order look-up page. Order data comes from outside and is only ever inserted as text
// (textContent, text nodes), never parsed as HTML.
"use strict";
(function () {
  // Checked here too, so a typo gets a clear answer without a round trip (mirrors the server).
  const UID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
  const MALFORMED = "is not a valid order_uid: use 1 to 64 letters, digits, '_' or '-'.";

  const $ = (id) => document.getElementById(id);
  const form = $("search");
  const input = $("uid");
  const status = $("status");
  const orderView = $("order");

  // Only the newest search may update the page; an older, slower answer is dropped.
  let latest = 0;

  function showStatus(kind, message) {
    status.className = "status status-" + kind;
    status.textContent = message;
    status.hidden = false;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function plain(value) {
    return value === undefined || value === null || value === "" ? "—" : String(value);
  }

  function number(value) {
    return Number.isFinite(value) ? value.toLocaleString() : plain(value);
  }

  // Amounts may be in the currency's major or minor unit; the order does not say which.
  function money(value, currency) {
    return Number.isFinite(value) ? number(value) + " " + plain(currency) : plain(value);
  }

  // Accepts an ISO 8601 string or Unix seconds; falls back to the value as it came.
  function date(value) {
    const parsed = new Date(typeof value === "number" ? value * 1000 : value);
    if (value === undefined || value === null || value === "" || isNaN(parsed.getTime())) {
      return plain(value);
    }
    const node = element("time", parsed.toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric",
      hour: "2-digit", minute: "2-digit", timeZoneName: "short",
    }));
    node.dateTime = parsed.toISOString();
    node.title = String(value);
    return node;
  }

  // rows: [label, string or Node]; append() turns strings into text nodes. Each pair gets a
  // div (allowed in a dl) so the CSS can lay pairs out as rows or as tiles.
  function fillFacts(list, rows) {
    list.replaceChildren();
    for (const [label, value] of rows) {
      const pair = document.createElement("div");
      const detail = document.createElement("dd");
      detail.append(value);
      pair.append(element("dt", label), detail);
      list.append(pair);
    }
  }

  // Phones show each row as a block; every cell then carries its column's name for the CSS.
  const columns = Array.from($("items").tHead.rows[0].cells, (cell) => cell.textContent);

  function fillItems(items, currency) {
    const body = $("items").tBodies[0];
    body.replaceChildren();
    let total = 0;
    for (const item of items) {
      const row = document.createElement("tr");
      row.append(
        element("td", plain(item.name)),
        element("td", plain(item.brand)),
        element("td", plain(item.size)),
        element("td", number(item.price), "num"),
        element("td", Number.isFinite(item.sale) ? item.sale + " %" : plain(item.sale), "num"),
        element("td", number(item.total_price), "num"),
        element("td", plain(item.status), "num"),
      );
      Array.from(row.cells).forEach((cell, index) => { cell.dataset.label = columns[index]; });
      body.append(row);
      if (Number.isFinite(item.total_price)) total += item.total_price;
    }
    const count = items.length === 1 ? "1 item" : items.length + " items";
    $("items-caption").textContent = count + ", amounts in " + plain(currency);
    $("items-total").textContent = money(total, currency);
  }

  function render(order) {
    const delivery = order.delivery || {};
    const payment = order.payment || {};
    const items = Array.isArray(order.items) ? order.items : [];
    $("order-uid").textContent = plain(order.order_uid);
    fillFacts($("summary"), [
      ["Track number", plain(order.track_number)],
      ["Created", date(order.date_created)],
      ["Customer", plain(order.customer_id)],
      ["Delivery service", plain(order.delivery_service)],
    ]);
    fillFacts($("delivery"), [
      ["Name", plain(delivery.name)],
      ["Phone", plain(delivery.phone)],
      ["Zip", plain(delivery.zip)],
      ["City", plain(delivery.city)],
      ["Address", plain(delivery.address)],
      ["Region", plain(delivery.region)],
      ["Email", plain(delivery.email)],
    ]);
    fillFacts($("payment"), [
      ["Amount", money(payment.amount, payment.currency)],
      ["Goods total", money(payment.goods_total, payment.currency)],
      ["Delivery cost", money(payment.delivery_cost, payment.currency)],
      ["Custom fee", money(payment.custom_fee, payment.currency)],
      ["Provider", plain(payment.provider)],
      ["Bank", plain(payment.bank)],
      ["Transaction", plain(payment.transaction)],
      ["Paid", date(payment.payment_dt)],
    ]);
    fillItems(items, payment.currency);
    $("json").textContent = JSON.stringify(order, null, 2);
    $("copy-status").textContent = "";
    document.title = "Order " + plain(order.order_uid) + " · Orders";
    orderView.hidden = false;
  }

  // /orders/{uid} answers 404 while the view is still being restored, so a miss is only
  // "not found" once the service says it is ready.
  async function stillRestoring() {
    try {
      return (await fetch("/readyz")).status === 503;
    } catch {
      return false;
    }
  }

  async function errorText(response) {
    try {
      return (await response.json()).error || "";
    } catch {
      return "";
    }
  }

  const NOT_READY = "The service is still loading orders, try again in a moment.";

  async function lookUp(uid) {
    const ticket = ++latest;
    const current = () => ticket === latest;
    orderView.hidden = true;
    document.title = "Orders";
    if (uid === "") {
      showStatus("info", "Enter an order_uid to look an order up.");
      return;
    }
    if (!UID_PATTERN.test(uid)) {
      showStatus("error", "“" + uid + "” " + MALFORMED);
      return;
    }
    showStatus("loading", "Loading order " + uid + "…");
    let response;
    try {
      response = await fetch("/orders/" + encodeURIComponent(uid), {
        headers: { Accept: "application/json" },
      });
    } catch {
      if (current()) {
        showStatus("error", "The service cannot be reached. Check that it is running and try again.");
      }
      return;
    }
    if (!current()) return;
    if (response.ok) {
      const order = await response.json().catch(() => null);
      if (!current()) return;
      if (order !== null && typeof order === "object") {
        status.hidden = true;
        render(order);
      } else {
        showStatus("error", "The service sent an answer that is not an order.");
      }
    } else if (response.status === 404) {
      const restoring = await stillRestoring();
      if (!current()) return;
      if (restoring) showStatus("warning", NOT_READY);
      else showStatus("warning", "Order " + uid + " not found.");
    } else if (response.status === 400) {
      const reason = await errorText(response);
      if (!current()) return;
      if (reason) showStatus("error", "The service refused “" + uid + "”: " + reason + ".");
      else showStatus("error", "“" + uid + "” " + MALFORMED);
    } else if (response.status === 503) {
      showStatus("warning", NOT_READY);
    } else {
      const reason = await errorText(response);
      if (current()) {
        showStatus("error", "The service answered " + response.status + (reason ? ": " + reason : "."));
      }
    }
  }

  // Over plain http on another host the Clipboard API is missing; selecting the text still
  // leaves the person one keystroke from a copy.
  async function copyJson() {
    const text = $("json").textContent;
    const note = $("copy-status");
    try {
      await navigator.clipboard.writeText(text);
      note.textContent = "Copied.";
    } catch {
      const range = document.createRange();
      range.selectNodeContents($("json"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      note.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const uid = input.value.trim();
    // Keeps the address shareable without filling the history with every search.
    const url = new URL(location.href);
    if (uid) url.searchParams.set("uid", uid);
    else url.searchParams.delete("uid");
    history.replaceState(null, "", url);
    lookUp(uid);
  });

  $("copy").addEventListener("click", copyJson);

  const linked = new URLSearchParams(location.search).get("uid");
  if (linked !== null) {
    input.value = linked;
    lookUp(linked.trim());
  } else {
    input.focus();
  }
})();
