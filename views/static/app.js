// Looks an order up by its uid and shows it. Order data is only ever set as text.
"use strict";
(function () {
  const form = document.getElementById("search");
  const input = document.getElementById("uid");
  const status = document.getElementById("status");
  const out = document.getElementById("order");
  const uidPattern = /^[A-Za-z0-9_-]{1,64}$/;

  function show(message, isError) {
    status.textContent = message;
    status.className = isError ? "error" : "";
  }

  async function lookUp(uid) {
    out.hidden = true;
    out.textContent = "";
    if (!uidPattern.test(uid)) {
      show("Malformed order_uid: use 1 to 64 letters, digits, '_' or '-'.", true);
      return;
    }
    show("Loading…", false);
    let response;
    try {
      response = await fetch("/orders/" + encodeURIComponent(uid), { headers: { Accept: "application/json" } });
    } catch (err) {
      show("The service cannot be reached.", true);
      return;
    }
    if (response.status === 404) { show("Order " + uid + " not found.", true); return; }
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      show(body.error || ("The service answered " + response.status + "."), true);
      return;
    }
    const order = await response.json();
    show("Order " + uid, false);
    out.textContent = JSON.stringify(order, null, 2);
    out.hidden = false;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const uid = input.value.trim();
    history.replaceState(null, "", "?uid=" + encodeURIComponent(uid));
    lookUp(uid);
  });

  const linked = new URLSearchParams(location.search).get("uid");
  if (linked) { input.value = linked; lookUp(linked); }
})();
