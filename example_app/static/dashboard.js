// The dashboard: EventSource on /stats/stream (one "stats" event a second),
// figures set with textContent, and a canvas chart of the last two minutes.
"use strict";

(function () {
  const root = document.getElementById("dashboard");
  const statsUrl = root.dataset.statsUrl;
  const statusEl = document.getElementById("status");
  const figures = {
    connections: document.getElementById("connections"),
    rate: document.getElementById("rate"),
    events: document.getElementById("events"),
  };
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");

  const SAMPLES = 60;
  const samples = []; // {connections, rate}, oldest first

  function setStatus(state) {
    if (statusEl.textContent !== state) statusEl.textContent = state;
    statusEl.dataset.state = state;
  }

  function color(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // The smallest of 1, 2, 5, 10, 20, 50... that is at least value.
  function niceMax(value) {
    let step = 1;
    for (;;) {
      for (const m of [1, 2, 5]) {
        if (step * m >= value) return step * m;
      }
      step *= 10;
    }
  }

  function draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = Math.round(width * 0.375);
    if (canvas.width !== Math.round(width * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const pad = { left: 40, right: 12, top: 28, bottom: 22 };
    const w = width - pad.left - pad.right;
    const h = height - pad.top - pad.bottom;
    let top = 1;
    for (const s of samples) top = Math.max(top, s.connections, s.rate);
    top = niceMax(top);

    ctx.font = "12px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.strokeStyle = color("--line");
    ctx.fillStyle = color("--muted");
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const f of [0, 0.5, 1]) {
      const y = pad.top + h - f * h;
      ctx.beginPath();
      ctx.moveTo(pad.left, y + 0.5);
      ctx.lineTo(pad.left + w, y + 0.5);
      ctx.stroke();
      ctx.fillText(String(Math.round(f * top * 10) / 10), pad.left - 6, y);
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText("−" + SAMPLES + " s", pad.left, height - 6);
    ctx.textAlign = "right";
    ctx.fillText("now", pad.left + w, height - 6);

    const series = [
      ["connections", color("--accent"), "open streams"],
      ["rate", color("--live"), "events/s"],
    ];
    let legendX = pad.left;
    ctx.textAlign = "left";
    for (const [key, stroke, label] of series) {
      ctx.strokeStyle = stroke;
      ctx.lineWidth = 2;
      ctx.beginPath();
      samples.forEach((s, i) => {
        const x = pad.left + w - (samples.length - 1 - i) * (w / (SAMPLES - 1));
        const y = pad.top + h - (s[key] / top) * h;
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      ctx.stroke();
      ctx.fillStyle = stroke;
      ctx.fillRect(legendX, 9, 14, 3);
      ctx.fillStyle = color("--fg");
      ctx.fillText(label, legendX + 20, 15);
      legendX += 30 + ctx.measureText(label).width;
    }
  }

  function onStats(ev) {
    let stats;
    try {
      stats = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    samples.push({ connections: Number(stats.connections), rate: Number(stats.rate) });
    while (samples.length > SAMPLES) samples.shift();
    figures.connections.textContent = String(stats.connections);
    figures.rate.textContent = String(stats.rate);
    figures.events.textContent = String(stats.events);
    draw();
  }

  const source = new EventSource(statsUrl);
  source.addEventListener("open", () => setStatus("live"));
  source.addEventListener("error", () => setStatus("reconnecting"));
  source.addEventListener("stats", onStats);
  window.addEventListener("resize", draw);
  window.addEventListener("pagehide", () => source.close());
  draw();
})();
