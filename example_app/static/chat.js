// The lobby page: EventSource on /stream/lobby, fetch() POST to /publish/lobby.
// Everything received is rendered with textContent, never as markup.
"use strict";

(function () {
  const root = document.getElementById("chat");
  const streamUrl = root.dataset.streamUrl;
  const publishUrl = root.dataset.publishUrl;
  const statusEl = document.getElementById("status");
  const list = document.getElementById("messages");
  const form = document.getElementById("send");
  const input = document.getElementById("message");
  const button = form.querySelector("button");
  const errorEl = document.getElementById("send-error");

  const MAX_ITEMS = 500;
  const RESET_NOTICES = {
    expired: "Stream reset: some older messages are no longer available.",
    unknown: "Stream reset: the server restarted; messages may be missing.",
  };

  let source = null;
  let lastEventId = "";
  let reopenTimer = null;
  let reopenAttempts = 0;
  let handedOver = false;

  function setStatus(state) {
    // One of: connecting, live, reconnecting (and refused, from people.js).
    if (statusEl.textContent !== state) statusEl.textContent = state;
    statusEl.dataset.state = state;
  }

  // Event data may be any JSON (or plain text): show {"text": ...} as its
  // text, a JSON string as itself, anything else as compact JSON.
  function displayText(raw) {
    let value;
    try {
      value = JSON.parse(raw);
    } catch (e) {
      return raw;
    }
    if (typeof value === "string") return value;
    if (value !== null && typeof value === "object" && typeof value.text === "string") {
      return value.text;
    }
    return JSON.stringify(value);
  }

  function addItem(kind, text, eventId) {
    const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const li = document.createElement("li");
    li.className = kind;
    if (eventId) li.dataset.id = eventId;
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = now.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.append(time, body);
    list.append(li);
    while (list.children.length > MAX_ITEMS) list.firstElementChild.remove();
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function onMessage(ev) {
    if (ev.lastEventId) lastEventId = ev.lastEventId;
    addItem("message", displayText(ev.data), ev.lastEventId);
  }

  function onReset(ev) {
    if (ev.lastEventId) lastEventId = ev.lastEventId;
    let reason = "unknown";
    try {
      const info = JSON.parse(ev.data);
      if (info && typeof info.reason === "string") reason = info.reason;
    } catch (e) {
      // keep "unknown"
    }
    addItem("notice", RESET_NOTICES[reason] || RESET_NOTICES.unknown, ev.lastEventId);
  }

  function connect() {
    // A fresh EventSource cannot send Last-Event-ID itself; the server
    // accepts the id as ?lastEventId= instead.
    const url = lastEventId
      ? streamUrl + "?lastEventId=" + encodeURIComponent(lastEventId)
      : streamUrl;
    source = new EventSource(url);
    source.addEventListener("open", () => {
      reopenAttempts = 0;
      setStatus("live");
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CONNECTING) {
        // The browser reconnects by itself after the server's retry delay.
        setStatus("reconnecting");
      } else if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error such as 503): retry ourselves.
        setStatus("reconnecting");
        scheduleReopen();
      }
    });
    source.addEventListener("message", onMessage);
    source.addEventListener("chat", onMessage);
    source.addEventListener("eventstream-reset", onReset);
  }

  function scheduleReopen() {
    if (reopenTimer !== null) return;
    const delay = Math.min(30000, 1000 * 2 ** reopenAttempts) * (0.75 + Math.random() / 2);
    reopenAttempts += 1;
    reopenTimer = setTimeout(() => {
      reopenTimer = null;
      if (!handedOver) connect();
    }, delay);
  }

  function showError(text) {
    errorEl.textContent = text;
    errorEl.hidden = !text;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    button.disabled = true;
    showError("");
    try {
      const response = await fetch(publishUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ data: { text: text }, event: "chat" }),
      });
      if (!response.ok) {
        let reason = "HTTP " + response.status;
        try {
          const body = await response.json();
          if (body && typeof body.error === "string") reason = body.error;
        } catch (e) {
          // not JSON: keep the status
        }
        throw new Error(reason);
      }
      // Not shown here: the message appears when it comes back on the stream.
      input.value = "";
    } catch (err) {
      showError("Not sent: " + err.message);
    } finally {
      button.disabled = false;
      input.focus();
    }
  });

  window.addEventListener("pagehide", () => {
    if (source) source.close();
  });

  // For people.js: once a nickname is chosen, a stream opened with a grant
  // (so that the server knows who is online) takes over from this
  // anonymous one, resuming from its last event and showing events here.
  window.lobbyChat = {
    handlers: { message: onMessage, chat: onMessage, "eventstream-reset": onReset },
    addItem: addItem,
    setStatus: setStatus,
    handOver() {
      handedOver = true;
      if (reopenTimer !== null) clearTimeout(reopenTimer);
      reopenTimer = null;
      if (source) source.close();
      return lastEventId;
    },
  };

  connect();
})();
