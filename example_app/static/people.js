// Who is online and private messages: streams opened with grants.
//
// EventSource cannot send headers, so a private stream carries a grant in
// its URL (/stream/<channel>?grant=...), fetched from /grant/<channel>.
// When a grant expires (or is revoked) the server ends the stream and
// refuses the browser's reconnect with a 403, and EventSource then gives up
// for good: this page fetches a new grant and opens a new EventSource with
// ?lastEventId= (a new EventSource has no last event id of its own), so no
// event is missed in between. If the server refuses a new grant too, the
// user was revoked: the page stops.
//
// Everything received is rendered with textContent, never as markup.
"use strict";

(function () {
  const chat = window.lobbyChat; // from chat.js, loaded first
  const root = document.getElementById("people");
  const joinForm = document.getElementById("join");
  const nickInput = document.getElementById("nickname");
  const meEl = document.getElementById("me");
  const online = document.getElementById("online");
  const privateForm = document.getElementById("private");
  const toInput = document.getElementById("to");
  const privateText = document.getElementById("private-text");
  const peopleStatus = document.getElementById("people-status");

  // URL templates with CHANNEL in place of the channel name.
  const urls = {
    stream: root.dataset.streamUrl,
    grant: root.dataset.grantUrl,
    presence: root.dataset.presenceUrl,
    publish: root.dataset.publishUrl,
  };

  // Several channels share one stream (and one grant), joined by "+":
  // browsers open at most six connections to a server over HTTP/1.1.
  function url(kind, channels) {
    const names = Array.isArray(channels) ? channels : [channels];
    return urls[kind].replace("CHANNEL", names.map(encodeURIComponent).join("+"));
  }

  class Refused extends Error {}

  async function fetchGrant(channels, user) {
    const response = await fetch(url("grant", channels) + "?user=" + encodeURIComponent(user), {
      headers: { Accept: "application/json" },
      cache: "no-store",
    });
    if (response.status === 403) throw new Refused("grant refused");
    if (!response.ok) throw new Error("HTTP " + response.status);
    const body = await response.json();
    return body.grant;
  }

  // An EventSource on `channels` opened with a grant for `user`, reopened
  // with a new grant and the last event id whenever the browser gives up.
  function grantedStream(channels, user, handlers, lastEventId, onState) {
    let source = null;
    let stopped = false;
    let attempts = 0;
    let timer = null;
    let lastId = lastEventId || "";

    async function open() {
      if (stopped) return;
      let grant;
      try {
        grant = await fetchGrant(channels, user);
      } catch (err) {
        if (err instanceof Refused) {
          stop();
          onState("refused");
        } else {
          onState("reconnecting");
          retryLater();
        }
        return;
      }
      if (stopped) return;
      let streamUrl = url("stream", channels) + "?grant=" + encodeURIComponent(grant);
      if (lastId) streamUrl += "&lastEventId=" + encodeURIComponent(lastId);
      const es = new EventSource(streamUrl);
      source = es;
      es.addEventListener("open", () => {
        attempts = 0;
        onState("live");
      });
      es.addEventListener("error", () => {
        if (es !== source) return;
        onState("reconnecting");
        // CONNECTING: the browser retries by itself (with the same grant;
        // fine until it expires). CLOSED: it gave up, most likely on a 403.
        if (es.readyState === EventSource.CLOSED) retryLater();
      });
      for (const [type, handler] of Object.entries(handlers)) {
        es.addEventListener(type, (ev) => {
          if (ev.lastEventId) lastId = ev.lastEventId;
          handler(ev);
        });
      }
    }

    function retryLater() {
      if (timer !== null || stopped) return;
      // At once the first time (an expired grant), then backing off.
      const delay = attempts ? Math.min(30000, 500 * 2 ** attempts) * (0.75 + Math.random() / 2) : 0;
      attempts += 1;
      timer = setTimeout(() => {
        timer = null;
        open();
      }, delay);
    }

    function stop() {
      stopped = true;
      if (timer !== null) clearTimeout(timer);
      timer = null;
      if (source) source.close();
    }

    open();
    return { stop: stop };
  }

  // -- who is online --

  let me = "";
  const present = new Set();

  function renderOnline() {
    const names = Array.from(present).sort();
    const items = names.map((name) => {
      const li = document.createElement("li");
      li.dataset.user = name;
      li.textContent = name;
      if (name === me) li.className = "me";
      return li;
    });
    online.replaceChildren(...items);
  }

  function userOf(ev) {
    try {
      const data = JSON.parse(ev.data);
      return data && typeof data.user === "string" ? data.user : null;
    } catch (e) {
      return null;
    }
  }

  function onJoin(ev) {
    const user = userOf(ev);
    if (user !== null) present.add(user);
    renderOnline();
  }

  function onLeave(ev) {
    const user = userOf(ev);
    if (user !== null) present.delete(user);
    renderOnline();
  }

  async function refreshPresence() {
    try {
      const response = await fetch(url("presence", "lobby"), {
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (!response.ok) return;
      const body = await response.json();
      present.clear();
      for (const name of Object.keys(body.users || {})) present.add(name);
      renderOnline();
    } catch (e) {
      // the join and leave events keep the list going
    }
  }

  // -- private messages --

  function privateText_(ev) {
    try {
      const data = JSON.parse(ev.data);
      if (data && typeof data.from === "string" && typeof data.text === "string") {
        return "from " + data.from + ": " + data.text;
      }
    } catch (e) {
      // not ours
    }
    return "private: " + ev.data;
  }

  function onPrivate(ev) {
    chat.addItem("private", privateText_(ev), ev.lastEventId);
  }

  function showPeopleStatus(text) {
    peopleStatus.textContent = text;
    peopleStatus.hidden = !text;
  }

  // -- joining --

  let streams = [];

  function onRefused() {
    for (const s of streams) s.stop();
    streams = [];
    chat.setStatus("refused");
    privateForm.hidden = true;
    showPeopleStatus("Access revoked: the server refused a new grant for " + me + ".");
  }

  joinForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const nick = nickInput.value.trim();
    if (!nick || me) return;
    me = nick;
    joinForm.hidden = true;
    meEl.textContent = "You are " + me;
    meEl.hidden = false;
    privateForm.hidden = false;
    showPeopleStatus("");
    const resumeFrom = chat.handOver();
    chat.setStatus("connecting");
    // One stream for the lobby and the user's private channel. Ids are
    // shared by every channel, so the chat's last id resumes both.
    const handlers = Object.assign({}, chat.handlers, {
      "eventstream-join": onJoin,
      "eventstream-leave": onLeave,
      private: onPrivate,
    });
    streams.push(
      grantedStream(["lobby", "private-" + me], me, handlers, resumeFrom, (state) => {
        if (state === "refused") {
          onRefused();
          return;
        }
        chat.setStatus(state);
        if (state === "live") refreshPresence();
      }),
    );
  });

  privateForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const to = toInput.value.trim();
    const text = privateText.value;
    if (!to || !text.trim()) return;
    showPeopleStatus("");
    try {
      const response = await fetch(url("publish", "private-" + to), {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ data: { from: me, text: text }, event: "private" }),
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      chat.addItem("private sent", "to " + to + ": " + text, "");
      privateText.value = "";
    } catch (err) {
      showPeopleStatus("Not sent: " + err.message);
    }
  });

  window.addEventListener("pagehide", () => {
    for (const s of streams) s.stop();
  });
})();
