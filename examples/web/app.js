// The Souk demo storefront: plain JavaScript, no build step. It searches the
// query API, places an order from the demo wallet through the command API,
// and shows the signed-in user's notifications live. Browsers cannot send an
// Authorization header with an EventSource, so the stream is opened with a
// single-use ticket (POST /notifications/tickets); when it drops, a new ticket
// is fetched and the stream resumes after the last event id it saw.
"use strict";

const config = Object.assign(
  { command_api: "http://127.0.0.1:8080", query_api: "http://127.0.0.1:8081" },
  window.SOUK_DEMO,
  Object.fromEntries(new URLSearchParams(location.hash.slice(1))),
);

const $ = (id) => document.getElementById(id);

function show(id, text) {
  $(id).textContent = text;
}

function money({ amount, currency }) {
  return `${(amount / 100).toFixed(2)} ${currency}`;
}

async function call(base, method, path, body) {
  const headers = { Authorization: `Bearer ${config.token}` };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    headers["Idempotency-Key"] = crypto.randomUUID();
  }
  const response = await fetch(base + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const error = answer && answer.error ? `${answer.error.code}: ${answer.error.message}` : response.status;
    throw new Error(`${method} ${path}: ${error}`);
  }
  return answer;
}

async function search(event) {
  if (event) event.preventDefault();
  const q = $("query").value.trim();
  const path = q ? `/search?q=${encodeURIComponent(q)}` : "/listings";
  show("search-status", "Searching...");
  try {
    const page = await call(config.query_api, "GET", path);
    const results = $("results");
    results.replaceChildren();
    for (const listing of page.items) {
      const item = document.createElement("li");
      item.dataset.listing = listing.id;
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = listing.title;
      const right = document.createElement("span");
      const price = document.createElement("span");
      price.className = "price";
      price.textContent = money(listing.price);
      const buy = document.createElement("button");
      buy.className = "buy";
      buy.textContent = "Buy one";
      buy.addEventListener("click", () => order(listing));
      right.append(price, buy);
      item.append(title, right);
      results.append(item);
    }
    show("search-status", `${page.items.length} listing(s)`);
  } catch (error) {
    show("search-status", error.message);
  }
}

async function order(listing) {
  show("order-status", `Ordering ${listing.title}...`);
  try {
    const placed = await call(config.command_api, "POST", "/orders", {
      lines: [{ listing_id: listing.id, quantity: 1 }],
      payment_method: "wallet_escrow",
      wallet_id: config.wallet,
      shipping_address: {
        name: "Ada Buyer", line1: "1 rue de la Paix", city: "Paris", postal_code: "75002", country: "FR",
      },
    });
    $("order-status").dataset.order = placed.id;
    show("order-status", `Order ${placed.id} placed; watch its status on the right.`);
  } catch (error) {
    show("order-status", error.message);
  }
}

let lastEventId = "";
let stream = null;

async function listen() {
  try {
    const { ticket } = await call(config.query_api, "POST", "/notifications/tickets");
    let url = `${config.query_api}/notifications/stream?ticket=${encodeURIComponent(ticket)}`;
    if (lastEventId) url += `&last_event_id=${encodeURIComponent(lastEventId)}`;
    stream = new EventSource(url);
  } catch (error) {
    show("stream-state", "retrying");
    setTimeout(listen, 2000);
    return;
  }
  stream.addEventListener("ready", () => {
    show("stream-state", "live");
    $("stream-state").classList.add("live");
  });
  for (const name of ["order_status", "funds_held", "funds_released", "reset", "lagged"]) {
    stream.addEventListener(name, (message) => {
      if (message.lastEventId) lastEventId = message.lastEventId;
      const data = JSON.parse(message.data);
      const item = document.createElement("li");
      item.dataset.event = name;
      if (data.status) item.dataset.status = data.status;
      if (data.order_id) item.dataset.order = data.order_id;
      const detail = data.status ? `${data.status} (${data.role})` : data.amount !== undefined ? money(data) : data.message;
      item.textContent = `${name}: ${detail}`;
      $("events").prepend(item);
    });
  }
  // A ticket opens one stream only: the browser's own reconnection would
  // reuse it, so reconnect by hand with a new ticket, resuming after the
  // last event seen.
  stream.onerror = () => {
    stream.close();
    $("stream-state").classList.remove("live");
    show("stream-state", "reconnecting");
    setTimeout(listen, 1000);
  };
}

function start() {
  $("search-form").addEventListener("submit", search);
  if (!config.token) {
    show("who", "No token: run ./scripts/up.sh, or give #token=... in the URL.");
    return;
  }
  show("who", `Signed in as ${config.user || "the demo buyer"}; paying from wallet ${config.wallet || "(none)"}`);
  listen();
  search();
}

start();
