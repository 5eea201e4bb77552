// dropr-server's status page: fetches ./stats and draws it.  Text goes in
// with textContent only: channel names and reasons come from the network.
"use strict";

var SERIES = [
  ["received", "#1f77b4"],
  ["stored", "#2ca02c"],
  ["duplicates", "#9467bd"],
  ["rejected", "#ff7f0e"],
  ["refused", "#d62728"],
];
var SVG = "http://www.w3.org/2000/svg";

function el(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function bytes(n) {
  var units = ["B", "KiB", "MiB", "GiB", "TiB"];
  var i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function seconds(s) {
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function perSecond(counts, interval) {
  // The last six whole slots: the newest one is still running.
  var whole = counts.slice(-7, -1);
  var sum = whole.reduce(function (a, b) { return a + b; }, 0);
  return whole.length ? sum / (whole.length * interval) : 0;
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren();
  if (!rows.length) {
    var td = el("td", empty, "muted");
    td.colSpan = columns;
    tbody.appendChild(el("tr")).appendChild(td);
  }
  rows.forEach(function (r) { tbody.appendChild(r); });
}

function channels(data) {
  var rates = data.rates.channels || {};
  var rows = Object.keys(data.channels).sort().map(function (name) {
    var c = data.channels[name];
    var tr = el("tr");
    tr.dataset.channel = name;
    tr.appendChild(el("td", name, "channel"));
    tr.appendChild(el("td", c.depth, "depth"));
    tr.appendChild(el("td", bytes(c.bytes), "bytes"));
    tr.appendChild(el("td", c.depth ? seconds(c.oldest_age) : "-", "oldest"));
    tr.appendChild(el("td", c.taken, "taken"));
    tr.appendChild(el("td", c.failed, c.failed ? "failed bad" : "failed"));
    var rate = rates[name] ? perSecond(rates[name], data.rates.interval) : 0;
    tr.appendChild(el("td", rate.toFixed(1), "rate"));
    return tr;
  });
  fill(document.querySelector("#channels tbody"), rows, "no channels yet", 7);
}

function errors(data) {
  var rows = data.errors.map(function (e) {
    var tr = el("tr");
    tr.appendChild(el("td", new Date(e.time * 1000).toLocaleTimeString(), "time"));
    tr.appendChild(el("td", e.status, "status bad"));
    tr.appendChild(el("td", e.peer || "", "peer"));
    tr.appendChild(el("td", e.reason, "reason"));
    return tr;
  });
  fill(document.querySelector("#errors tbody"), rows, "none", 4);
}

function chart(data) {
  var svg = document.getElementById("chart");
  var w = 720, h = 180, left = 40, bottom = 20, top = 10;
  var series = data.rates.series;
  var n = 0, max = 1;
  SERIES.forEach(function (s) {
    var counts = series[s[0]] || [];
    n = Math.max(n, counts.length);
    counts.forEach(function (c) { max = Math.max(max, c); });
  });
  svg.replaceChildren();
  function line(x1, y1, x2, y2, colour) {
    var l = document.createElementNS(SVG, "line");
    l.setAttribute("x1", x1); l.setAttribute("y1", y1);
    l.setAttribute("x2", x2); l.setAttribute("y2", y2);
    l.setAttribute("stroke", colour);
    svg.appendChild(l);
  }
  function label(x, y, text, anchor) {
    var t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y);
    t.setAttribute("font-size", "11"); t.setAttribute("fill", "#555");
    t.setAttribute("text-anchor", anchor || "start");
    t.textContent = text;
    svg.appendChild(t);
  }
  line(left, top, left, h - bottom, "#999");
  line(left, h - bottom, w - 5, h - bottom, "#999");
  label(left - 4, top + 8, String(max), "end");
  label(left - 4, h - bottom, "0", "end");
  label(left, h - 4, "-" + Math.round((n * data.rates.interval) / 60) + " min");
  label(w - 5, h - 4, "now", "end");
  var step = n > 1 ? (w - 5 - left) / (n - 1) : 0;
  var legend = document.getElementById("legend");
  legend.replaceChildren();
  SERIES.forEach(function (s) {
    var counts = series[s[0]] || [];
    var points = counts.map(function (c, i) {
      var y = h - bottom - (c / max) * (h - bottom - top);
      return (left + i * step).toFixed(1) + "," + y.toFixed(1);
    });
    var p = document.createElementNS(SVG, "polyline");
    p.setAttribute("points", points.join(" "));
    p.setAttribute("fill", "none");
    p.setAttribute("stroke", s[1]);
    p.setAttribute("stroke-width", "1.5");
    p.setAttribute("data-series", s[0]);
    svg.appendChild(p);
    var total = counts.reduce(function (a, b) { return a + b; }, 0);
    var item = el("span");
    var swatch = el("i");
    swatch.style.background = s[1];
    item.appendChild(swatch);
    item.appendChild(document.createTextNode(s[0] + " (" + total + ")"));
    legend.appendChild(item);
  });
}

function summary(data) {
  var t = data.totals || {};
  // The store's running totals over all channels; the table shows the
  // first few channels by name only (channels_shown of channels_total).
  var shown = Object.keys(data.channels).length;
  var total = data.channels_total === undefined ? shown : data.channels_total;
  var depth = 0;
  if (data.usage) {
    depth = data.usage.messages;
  } else {
    Object.keys(data.channels).forEach(function (k) { depth += data.channels[k].depth; });
  }
  document.getElementById("summary").textContent =
    "up " + seconds(data.uptime) + " \u00b7 " + total + " channels" +
    (shown < total ? " (the first " + shown + " by name listed)" : "") +
    ", " + depth + " messages waiting \u00b7 since start: " +
    (t.received || 0) + " received, " + (t.stored || 0) + " stored, " +
    (t.duplicates || 0) + " duplicates, " + (t.rejected || 0) + " rejected" +
    (data.stats_error ? " \u00b7 figures stale: " + data.stats_error : "");
  document.getElementById("summary").className = "";
}

function refresh() {
  fetch("stats", { cache: "no-store" })
    .then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    })
    .then(function (data) {
      summary(data);
      channels(data);
      chart(data);
      errors(data);
      document.body.dataset.loaded = "1";
    })
    .catch(function (e) {
      var s = document.getElementById("summary");
      s.textContent = "cannot read the figures: " + e.message;
      s.className = "bad";
    });
}

refresh();
setInterval(refresh, 5000);
