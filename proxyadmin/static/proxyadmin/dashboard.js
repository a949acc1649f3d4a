/* The live dashboard page (templates/proxyadmin/dashboard.html).
 *
 * Keeps a websocket to /ws/dashboard/ (reconnecting with backoff), hands its
 * messages to dashboard-model.js, and redraws the totals, the uPlot charts and the
 * tables once a second. What the server sends reaches the page only as text nodes
 * and attribute values, never as HTML. ``window.dashboard`` exposes the state for
 * the browser test.
 */
(function () {
  "use strict";

  const Model = window.ProxyDashboardModel;
  const root = document.getElementById("dashboard");
  if (!root || !Model) return;

  const BACKOFF_FIRST = 1; // seconds before the first reconnection attempt
  const BACKOFF_MAX = 30;
  const CHART_HEIGHT = 180;
  const STATUS_COLORS = { "2xx": [46, 133, 64], "3xx": [58, 111, 196], "4xx": [208, 138, 0], "5xx": [198, 40, 40] };
  const IN_COLOR = [58, 111, 196];
  const OUT_COLOR = [142, 68, 173];
  const ACTIVE_COLOR = [0, 128, 128];
  const REFUSED_CODES = new Set([4401, 4403]);
  // As the control plane judges nodes (ProxyNode.ONLINE_SECONDS, STALE_SECONDS), applied
  // between its "nodes" messages to the node's latest tick or report.
  const ONLINE_SECONDS = 5;
  const STALE_SECONDS = 60;

  const live = new Model.LiveModel();
  const history = new Model.HistoryModel();
  const warnDays = Number(root.dataset.certWarningDays) || 30;
  // Time ranges of the charts: the live per-second charts, or the per-minute ones over 1 h or 24 h.
  const RANGES = { "15m": null, "1h": { minutes: 60, text: "last hour" }, "24h": { minutes: 1440, text: "last 24 hours" } };
  const page = {
    received: false, revision: null, nodes: [], certificates: [], warnings: [], listsDirty: false,
    hostPages: {}, range: "15m",
  };
  const connection = { socket: null, status: "connecting", attempts: 0, retryAt: 0, closeCode: null };
  const charts = {};
  let rawLive = null; // the unstacked series behind the stacked requests chart, for its legend
  // Each control-plane process ticks once a second for all its nodes; a tick's "nodes" says
  // when each was last heard from, and its worker processes.
  const nodeTicks = new Map(); // node name -> {time, workers, worker_restarts}
  const lag = { lagging: false, behind: 0, dropped: 0 };
  const dashboard = { live, history, page, charts, connection, nodeTicks, lag, ticks: 0, renders: 0 };
  window.dashboard = dashboard;

  const now = () => Date.now() / 1000;
  const serverNow = () => now() + (live.clockOffset || 0);
  const byId = (id) => document.getElementById(id);

  // ---- formatting ---------------------------------------------------------------

  function formatCount(n) {
    return Math.round(n).toLocaleString("en-US");
  }

  function formatRate(n) {
    return n < 10 ? n.toFixed(1) : formatCount(n);
  }

  function formatBytes(n, suffix) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    const digits = unit > 0 && value < 10 ? 1 : 0;
    return value.toFixed(digits) + " " + units[unit] + (suffix || "");
  }

  function formatMs(ms) {
    return ms === null ? "–" : (ms < 10 ? ms.toFixed(1) : formatCount(ms)) + " ms";
  }

  function toEpoch(value) {
    if (typeof value === "number" && Number.isFinite(value)) return value > 1e12 ? value / 1000 : value;
    if (typeof value === "string" && value) {
      const parsed = Date.parse(value);
      return Number.isNaN(parsed) ? null : parsed / 1000;
    }
    return null;
  }

  function formatAgo(epoch) {
    if (epoch === null) return "never";
    const seconds = Math.max(0, serverNow() - epoch);
    if (seconds < 2) return "just now";
    if (seconds < 120) return Math.round(seconds) + " s ago";
    if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
    if (seconds < 172800) return Math.round(seconds / 3600) + " h ago";
    return new Date(epoch * 1000).toISOString().slice(0, 10);
  }

  function formatDate(value) {
    const epoch = toEpoch(value);
    return epoch === null ? String(value || "") : new Date(epoch * 1000).toISOString().slice(0, 10);
  }

  function text(value) {
    return value === null || value === undefined || value === "" ? "–" : String(value);
  }

  /** A same-site path from the server, or null: nothing else becomes a link. */
  function sitePath(url) {
    return typeof url === "string" && url.startsWith("/") && !url.startsWith("//") ? url : null;
  }

  function rgba(color, alpha) {
    return "rgba(" + color.join(",") + "," + alpha + ")";
  }

  // ---- DOM helpers (text only) ----------------------------------------------------

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    node.append(...children.filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
    return node;
  }

  function setText(id, value) {
    const node = byId(id);
    if (node && node.textContent !== value) node.textContent = value;
  }

  /**
   * Bring a tbody to ``rows`` ([{key, cells: [{text, className, title, build}]}]),
   * touching only the cells that changed, so hovering and selecting survive updates.
   */
  function fillTable(tbody, rows) {
    const existing = new Map([...tbody.rows].map((tr) => [tr.dataset.key, tr]));
    rows.forEach((row, index) => {
      let tr = existing.get(row.key);
      existing.delete(row.key);
      if (!tr || tr.cells.length !== row.cells.length) {
        if (tr) tr.remove();
        tr = document.createElement("tr");
        tr.dataset.key = row.key;
        row.cells.forEach(() => tr.append(document.createElement("td")));
      }
      row.cells.forEach((cell, i) => {
        const td = tr.cells[i];
        const signature = JSON.stringify([cell.text, cell.className || "", cell.title || ""]);
        if (td.dataset.signature === signature) return;
        td.dataset.signature = signature;
        td.className = cell.className || "";
        if (cell.title) td.title = cell.title;
        else td.removeAttribute("title");
        td.replaceChildren(cell.build ? cell.build() : String(cell.text));
      });
      if (tbody.rows[index] !== tr) tbody.insertBefore(tr, tbody.rows[index] || null);
    });
    for (const tr of existing.values()) tr.remove();
  }

  function showEmpty(id, empty) {
    const node = byId(id);
    if (node) node.hidden = !empty;
  }

  // ---- charts -------------------------------------------------------------------

  function cssVar(name, fallback) {
    const value = getComputedStyle(document.body).getPropertyValue(name).trim();
    return value || fallback;
  }

  // Tick steps for charts of whole things (connections, requests per minute): no "0.5";
  // and for bytes, powers of two, so that the ticks read 1 KiB, 2 KiB, 4 KiB.
  const WHOLE_STEPS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9].map((p) => m * p))
    .sort((a, b) => a - b);
  const BYTE_STEPS = Array.from({ length: 48 }, (_, i) => 2 ** i);

  /** Room for the longest tick label of the y axis, so "2.9 KiB/s" is not cut. */
  function axisSize(u, values) {
    const longest = values ? Math.max(0, ...values.map((v) => String(v).length)) : 4;
    return Math.max(40, longest * 7 + 22);
  }

  function makeChart(key, containerId, series, format, steps) {
    const container = byId(containerId);
    if (typeof window.uPlot !== "function" || !container) return;
    const quiet = cssVar("--body-quiet-color", "#666");
    const hairline = cssVar("--hairline-color", "#e8e8e8");
    const axis = { stroke: quiet, grid: { stroke: hairline, width: 1 }, ticks: { stroke: hairline, width: 1 } };
    const width = () => Math.max(container.clientWidth, 240);
    const chart = new window.uPlot({
      width: width(),
      height: CHART_HEIGHT,
      series: [{}, ...series],
      scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [{ ...axis }, {
        ...axis, size: axisSize, values: (u, splits) => splits.map(format), ...(steps ? { incrs: steps } : {}),
      }],
      cursor: { drag: { x: false, y: false } },
    }, [[], ...series.map(() => [])], container);
    charts[key] = chart;
    if (typeof ResizeObserver === "function") {
      new ResizeObserver(() => chart.setSize({ width: width(), height: CHART_HEIGHT })).observe(container);
    }
  }

  function line(label, color, format, fill) {
    return {
      label, stroke: rgba(color, 1), width: 1.5, ...(fill ? { fill: rgba(color, 0.15) } : {}),
      value: (u, v) => (v === null || v === undefined ? "–" : format(v)),
    };
  }

  function createCharts() {
    if (typeof window.uPlot !== "function") {
      if (!byId("chart-library-missing")) {
        root.prepend(el("p", "errornote", "The chart library (uPlot) did not load, so the charts cannot be drawn. ",
          "Install it in the project folder with ", el("code", null, "npm ci --no-audit --no-fund"),
          " and restart the control plane."));
      }
      return;
    }
    const perSecond = (v) => formatRate(v) + "/s";
    // Stacked: each series is the running sum up to its class and fills to zero, drawn
    // top first so the lower classes paint over it; the legend shows each class' own rate.
    const classes = ["5xx", "4xx", "3xx", "2xx"];
    makeChart("requests", "chart-requests", classes.map((name) => ({
      label: name, stroke: rgba(STATUS_COLORS[name], 1), width: 1, fill: rgba(STATUS_COLORS[name], 0.55),
      value: (u, v, series, index) => {
        const raw = rawLive && index !== null && index !== undefined ? rawLive[name][index] : null;
        return raw === null || raw === undefined ? "–" : perSecond(raw);
      },
    })), formatRate);
    const bandwidth = (v) => formatBytes(v, "/s");
    makeChart("bandwidth", "chart-bandwidth",
      [line("in", IN_COLOR, bandwidth, true), line("out", OUT_COLOR, bandwidth, true)], bandwidth, BYTE_STEPS);
    makeChart("active", "chart-active", [line("active", ACTIVE_COLOR, formatCount, true)], formatCount, WHOLE_STEPS);
    makeChart("dayRequests", "chart-day-requests",
      [line("requests/min", STATUS_COLORS["2xx"], formatCount, true),
        line("errors/min", STATUS_COLORS["5xx"], formatCount, false)], formatCount, WHOLE_STEPS);
    const perMinute = (v) => formatBytes(v, "/min");
    makeChart("dayBandwidth", "chart-day-bandwidth",
      [line("in", IN_COLOR, perMinute, true), line("out", OUT_COLOR, perMinute, true)], (v) => formatBytes(v), BYTE_STEPS);
  }

  function drawCharts(at) {
    const series = live.series(at);
    rawLive = series;
    if (charts.requests) {
      const stacked = Model.stack([series["2xx"], series["3xx"], series["4xx"], series["5xx"]]);
      charts.requests.setData([series.time, stacked[3], stacked[2], stacked[1], stacked[0]]);
    }
    if (charts.bandwidth) charts.bandwidth.setData([series.time, series.bytes_in, series.bytes_out]);
    if (charts.active) charts.active.setData([series.time, series.active]);
    const range = RANGES[page.range];
    const day = history.series(serverNow(), range ? range.minutes : undefined);
    if (charts.dayRequests) charts.dayRequests.setData([day.time, day.requests, day.errors]);
    if (charts.dayBandwidth) charts.dayBandwidth.setData([day.time, day.bytes_in, day.bytes_out]);
  }

  /** Show the charts of one time range ("15m", "1h", "24h"); kept in the address as #range=1h. */
  function setRange(name) {
    if (!Object.prototype.hasOwnProperty.call(RANGES, name)) return;
    page.range = name;
    const range = RANGES[name];
    byId("charts-seconds").hidden = range !== null;
    byId("charts-minutes").hidden = range === null;
    for (const node of root.querySelectorAll(".dash-range-text")) node.textContent = range ? range.text : "";
    for (const button of root.querySelectorAll(".dash-range-button")) {
      button.setAttribute("aria-pressed", String(button.dataset.range === name));
    }
    if (window.history && window.history.replaceState) {
      window.history.replaceState(null, "", name === "15m" ? window.location.pathname : "#range=" + name);
    }
    drawCharts(now());
  }

  function setUpRanges() {
    for (const button of root.querySelectorAll(".dash-range-button")) {
      button.addEventListener("click", () => setRange(button.dataset.range));
    }
    const asked = /^#range=(\w+)$/.exec(window.location.hash);
    if (asked && asked[1] !== "15m") setRange(asked[1]);
  }

  // ---- page sections ------------------------------------------------------------

  function drawTotals(at) {
    const totals = live.totals(at);
    const online = page.nodes.filter((node) => node && nodeStatus(node) === "online").length;
    setText("total-active", formatCount(totals.active));
    setText("total-rps", formatRate(totals.rps));
    setText("total-requests", formatCount(totals.requests));
    setText("total-bytes-in", formatBytes(totals.bytes_in, "/s"));
    setText("total-bytes-out", formatBytes(totals.bytes_out, "/s"));
    setText("total-errors", formatRate(totals.errors) + "/s");
    setText("total-nodes", page.received ? String(online) : "–");
    byId("total-errors").parentElement.classList.toggle("is-bad", totals.errors > 0);
    byId("no-node").hidden = !(page.received && online === 0);
  }

  function drawHosts(at) {
    const rows = live.hosts(at).map((row) => ({
      key: row.host,
      cells: [
        hostCell(row.host),
        { text: formatRate(row.rps), className: "num" },
        { text: formatCount(row.active), className: "num" },
        { text: formatCount(row.counts["2xx"]), className: "num" },
        { text: formatCount(row.counts["3xx"]), className: "num" },
        { text: formatCount(row.counts["4xx"]), className: "num" },
        { text: formatCount(row.counts["5xx"]), className: row.counts["5xx"] > 0 ? "num is-bad" : "num" },
        { text: formatMs(row.p50), className: "num" },
        { text: formatMs(row.p95), className: "num" },
        { text: formatBytes(row.counts.bytes_in), className: "num" },
        { text: formatBytes(row.counts.bytes_out), className: "num" },
        { text: formatCount(row.counts.handshake_failures),
          className: row.counts.handshake_failures > 0 ? "num is-bad" : "num" },
        { text: [row.counts.unauthorized, row.counts.denied, row.counts.rate_limited].map(formatCount).join(" / "),
          className: "num" },
        targetsCell(row.targets),
      ],
    }));
    fillTable(byId("hosts-table").tBodies[0], rows);
    showEmpty("hosts-empty", rows.length === 0);
  }

  /**
   * The host's name, linked to its admin page when the configuration has it (not "-" or a
   * removed host), and a button that shows its recent requests.
   */
  function hostCell(host) {
    const href = Object.prototype.hasOwnProperty.call(page.hostPages, host) ? sitePath(page.hostPages[host]) : null;
    const unmatched = host === "-";
    return {
      text: host + " " + (href || ""), className: unmatched ? "host unmatched" : "host",
      title: unmatched ? "traffic that matched no host" : "",
      build: () => {
        const fragment = document.createDocumentFragment();
        if (href) {
          const link = el("a", null, host);
          link.href = href;
          link.title = "Open the host " + host + " in the admin";
          fragment.append(link);
        } else {
          fragment.append(host, unmatched ? el("span", "quiet", " no matching host") : "");
        }
        const button = el("button", "dash-recent-button", "recent");
        button.type = "button";
        button.title = "Show the recent requests of " + host;
        button.addEventListener("click", () => showRecent(host));
        fragment.append(" ", button);
        return fragment;
      },
    };
  }

  // ---- recent requests of one host ------------------------------------------------

  const RECENT_LINES = 200; // per host, as agentproto.MAX_RECENT_PER_HOST
  const RECENT_RENEW = 10; // seconds between the page's renewals of its watch
  const recent = { host: null, lines: new Map(), filter: "all", timer: null };
  dashboard.recent = recent;

  /** "2xx" … "5xx" from an access-log line (its status is the field after the quoted request). */
  function lineStatus(line) {
    const match = /" ([1-5])\d\d \d+ [\d.]+ms \S+$/.exec(line);
    return match ? match[1] + "xx" : null;
  }

  function sendWatch() {
    const socket = connection.socket;
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "recent.watch", host: recent.host }));
    }
  }

  function showRecent(host) {
    if (recent.host !== host) {
      recent.host = host;
      recent.lines.clear();
    }
    byId("recent").hidden = false;
    setText("recent-host", host);
    sendWatch();
    if (recent.timer === null) recent.timer = window.setInterval(sendWatch, RECENT_RENEW * 1000);
    drawRecent();
    byId("recent").scrollIntoView({ block: "nearest" });
  }

  function hideRecent() {
    recent.host = null;
    recent.lines.clear();
    byId("recent").hidden = true;
    sendWatch();
    if (recent.timer !== null) window.clearInterval(recent.timer);
    recent.timer = null;
  }

  function addRecent(message) {
    if (message.host !== recent.host || !Array.isArray(message.lines)) return;
    const node = String(message.node);
    for (const entry of message.lines) {
      if (!Array.isArray(entry) || typeof entry[1] !== "string") continue;
      recent.lines.set(node + "\n" + String(entry[0]), { node, seq: number(entry[0]), line: entry[1] });
    }
    // Newest first: lines start with their UTC time; the node's numbering breaks ties.
    const sorted = [...recent.lines.entries()].sort(([, a], [, b]) =>
      (a.line < b.line ? 1 : a.line > b.line ? -1 : b.seq - a.seq));
    recent.lines = new Map(sorted.slice(0, RECENT_LINES));
    drawRecent();
  }

  function number(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : 0;
  }

  function drawRecent() {
    if (recent.host === null) return;
    const shown = [...recent.lines.values()].filter((entry) => recent.filter === "all"
      || lineStatus(entry.line) === recent.filter);
    // textContent only: request targets are whatever clients sent.
    byId("recent-lines").replaceChildren(...shown.map((entry) => {
      const item = el("li", "status-line status-line-" + (lineStatus(entry.line) || "other"), entry.line);
      item.title = "node " + entry.node;
      return item;
    }));
    showEmpty("recent-empty", shown.length === 0);
  }

  function setUpRecent() {
    for (const button of root.querySelectorAll(".dash-status-button")) {
      button.addEventListener("click", () => {
        recent.filter = button.dataset.status;
        for (const other of root.querySelectorAll(".dash-status-button")) {
          other.setAttribute("aria-pressed", String(other === button));
        }
        drawRecent();
      });
    }
    byId("recent-close").addEventListener("click", hideRecent);
  }

  /** "address on node: cooling down (last error)", one line per target some node finds down. */
  function downText(down) {
    return down.map((t) => t.address + " on " + t.node + ": " + t.state + (t.lastError ? " (" + t.lastError + ")" : ""))
      .join("\n");
  }

  function targetsCell(targets) {
    if (!targets) return { text: "–", className: "num quiet" };
    return {
      text: formatCount(targets.healthy) + " / " + formatCount(targets.total),
      className: targets.healthy < targets.total ? "num is-bad" : "num",
      title: targets.down.length ? downText(targets.down) : "upstream " + targets.upstream,
    };
  }

  function drawUpstreams(at) {
    const rows = live.upstreams(at).map((row) => ({
      key: row.name,
      cells: [
        { text: row.name, className: "upstream-name" },
        {
          text: row.nodes.map((n) => n.node + " " + n.healthy + " / " + n.total).join(", "),
          className: row.nodes.some((n) => n.healthy < n.total) ? "is-bad" : "",
        },
        { text: formatCount(row.retries), className: row.retries > 0 ? "num is-bad" : "num" },
        row.down.length
          ? { text: downText(row.down), className: "error-text",
            build: () => el("ul", "dash-down", ...row.down.map((t) => el("li", null,
              el("strong", null, t.address), " on " + t.node + ": " + t.state,
              t.lastError ? el("span", "quiet", " — " + t.lastError) : null))) }
          : { text: "–", className: "quiet" },
      ],
    }));
    fillTable(byId("upstreams-table").tBodies[0], rows);
    showEmpty("upstreams-empty", rows.length === 0);
  }

  function revisionCell(node) {
    const applied = node.applied_revision;
    const current = node.current_revision !== undefined && node.current_revision !== null
      ? node.current_revision : page.revision;
    if (applied === null || applied === undefined) return { text: "–" };
    if (current === null || current === undefined || applied === current) {
      return { text: String(applied) + (current === applied ? " (current)" : "") };
    }
    return { text: String(applied) + " — current is " + String(current), className: "is-bad" };
  }

  function rejectedCell(node) {
    if (!node.last_error) return { text: "–" };
    const revision = node.last_error_revision;
    const prefix = revision !== null && revision !== undefined ? "revision " + String(revision) + ": " : "";
    return { text: prefix + String(node.last_error), className: "error-text" };
  }

  function listenersText(listeners) {
    if (!Array.isArray(listeners) || listeners.length === 0) return "–";
    return listeners.map((item) => {
      if (item && typeof item === "object") return [item.name, item.address].filter(Boolean).join(" ");
      return String(item);
    }).join(", ");
  }

  /** When the node was last heard of: its latest report to the control plane, or tick. */
  function lastSeen(node) {
    const reported = toEpoch(node.last_seen);
    const ticked = nodeTicks.get(node.name);
    if (!ticked) return reported;
    return reported === null ? ticked.time : Math.max(reported, ticked.time);
  }

  /** Worker processes of the node, and how often they were restarted (issue 12's supervisor). */
  function workersCell(node) {
    const ticked = nodeTicks.get(node.name);
    const workers = ticked ? ticked.workers : node.workers;
    const restarts = ticked ? ticked.worker_restarts : node.worker_restarts;
    if (typeof workers !== "number") return { text: "–", className: "num" };
    const restarted = typeof restarts === "number" && restarts > 0;
    return {
      text: String(workers) + (restarted ? " (" + restarts + " restarts)" : ""),
      className: "num" + (restarted ? " is-bad" : ""),
    };
  }

  function nodeStatus(node) {
    if (node.status !== "online" && node.status !== "stale") return "offline";
    const seen = lastSeen(node);
    const age = seen === null ? Infinity : serverNow() - seen;
    if (node.status === "online" && age < ONLINE_SECONDS) return "online";
    return age < STALE_SECONDS ? "stale" : "offline";
  }

  function drawNodes() {
    const rows = page.nodes.filter((node) => node && typeof node === "object").map((node) => {
      const status = nodeStatus(node);
      const seen = lastSeen(node);
      return {
        key: String(node.name),
        cells: [
          { text: text(node.name), className: "node-name" },
          { text: status, build: () => el("span", "status status-" + status, status) },
          revisionCell(node),
          { text: formatAgo(seen), title: seen === null ? "" : new Date(seen * 1000).toISOString() },
          { text: text(node.version) },
          { text: text(node.pid), className: "num" },
          workersCell(node),
          { text: listenersText(node.listeners) },
          rejectedCell(node),
        ],
      };
    });
    fillTable(byId("nodes-table").tBodies[0], rows);
    showEmpty("nodes-empty", page.received && rows.length === 0);
  }

  function drawTls(at) {
    const tls = live.tls(at);
    for (const [id, tallies] of [["tls-versions", tls.versions], ["tls-ciphers", tls.ciphers]]) {
      const total = tallies.reduce((sum, [, count]) => sum + count, 0);
      fillTable(byId(id).tBodies[0], tallies.map(([name, count]) => ({
        key: name,
        cells: [
          { text: name, className: "tls-name" },
          { text: formatCount(count), className: "num" },
          { text: Math.round((100 * count) / total) + " %", className: "num quiet" },
        ],
      })));
      showEmpty(id + "-empty", tallies.length === 0);
    }
  }

  function certificateItem(cert) {
    const days = Number(cert.days);
    let when;
    if (days < 0) when = "expired " + Math.abs(days) + (Math.abs(days) === 1 ? " day ago" : " days ago");
    else if (days === 0) when = "expires today";
    else when = "expires in " + days + (days === 1 ? " day" : " days");
    const href = sitePath(cert.url);
    const name = href ? el("a", null, text(cert.name)) : el("strong", null, text(cert.name));
    if (href) name.href = href;
    return el("li", days < 0 ? "expired" : "expiring", name, " — " + when,
      el("span", "quiet", " (not after " + formatDate(cert.not_after) + ")"));
  }

  function drawLists() {
    if (!page.listsDirty) return;
    page.listsDirty = false;
    const certificates = page.certificates
      .filter((cert) => cert && typeof cert === "object" && Number.isFinite(Number(cert.days)))
      .filter((cert) => Number(cert.days) <= warnDays)
      .sort((a, b) => Number(a.days) - Number(b.days));
    byId("certificates").replaceChildren(...certificates.map(certificateItem));
    showEmpty("certificates-empty", certificates.length === 0);
    const warnings = byId("warnings");
    warnings.replaceChildren(...page.warnings.map((warning) => el("li", "warning", text(warning))));
    warnings.hidden = page.warnings.length === 0;
  }

  function drawLag() {
    const banner = byId("lagging");
    if (!banner) return;
    banner.hidden = !lag.lagging;
    setText("lagging-behind", String(Math.round(lag.behind)));
  }

  function drawConnection() {
    const node = byId("connection-status");
    let label;
    if (connection.status === "live") label = "Live";
    else if (connection.status === "connecting") label = "Connecting…";
    else {
      const wait = Math.max(0, Math.ceil((connection.retryAt - performance.now()) / 1000));
      label = "Disconnected — reconnecting in " + wait + " s";
      if (REFUSED_CODES.has(connection.closeCode)) label += " (refused: reload the page if your session has ended)";
    }
    if (node.textContent !== label) node.textContent = label;
    node.className = "connection " + connection.status;
    root.classList.toggle("is-disconnected", connection.status === "disconnected");
  }

  function render() {
    const at = now();
    drawConnection();
    drawTotals(at);
    drawHosts(at);
    drawUpstreams(at);
    drawNodes();
    drawTls(at);
    drawLists();
    drawCharts(at);
    dashboard.renders += 1;
  }

  // ---- the websocket ---------------------------------------------------------------

  function receive(message) {
    if (!message || typeof message !== "object") return;
    if (message.type === "state") {
      page.received = true;
      page.revision = message.revision;
      page.nodes = Array.isArray(message.nodes) ? message.nodes : [];
      page.certificates = Array.isArray(message.certificates) ? message.certificates : [];
      page.warnings = Array.isArray(message.warnings) ? message.warnings : [];
      page.hostPages = readHostPages(message.host_pages);
      page.listsDirty = true;
      history.load(message.history);
      live.load(message.live, now());
      connection.attempts = 0;
      connection.status = "live";
      if (recent.host !== null) sendWatch(); // a new socket: the nodes send the host's lines again
      render();
    } else if (message.type === "tick") {
      for (const [name, summary] of Object.entries(message.nodes && typeof message.nodes === "object" ? message.nodes : {})) {
        if (summary && typeof summary === "object" && typeof summary.time === "number") nodeTicks.set(name, summary);
      }
      if (live.addTick(message, now())) {
        history.addTick(message);
        dashboard.ticks += 1;
      }
    } else if (message.type === "lagging") {
      // The control plane dropped ticks this page got too late; the charts have a gap there.
      lag.lagging = message.lagging === true;
      lag.behind = Number(message.behind) || 0;
      lag.dropped = Number(message.dropped) || 0;
      // What the dropped ticks held, from the control plane's memory, at their own times.
      if (message.live) live.load(message.live, now());
      drawLag();
    } else if (message.type === "recent") {
      addRecent(message);
    } else if (message.type === "nodes") {
      page.nodes = Array.isArray(message.nodes) ? message.nodes : [];
      if (message.host_pages !== undefined) page.hostPages = readHostPages(message.host_pages);
      drawNodes();
      drawTotals(now());
    }
  }

  function readHostPages(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value) ? value : {};
  }

  function socketUrl() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + window.location.host + (root.dataset.socketPath || "/ws/dashboard/");
  }

  function connect() {
    connection.status = "connecting";
    drawConnection();
    let socket;
    try {
      socket = new WebSocket(socketUrl());
    } catch (error) {
      reconnectLater(null);
      return;
    }
    connection.socket = socket;
    socket.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      receive(message);
    });
    socket.addEventListener("close", (event) => {
      if (connection.socket !== socket) return;
      connection.socket = null;
      reconnectLater(event.code);
    });
  }

  function reconnectLater(code) {
    const delay = Math.min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** connection.attempts) * (0.8 + 0.4 * Math.random());
    connection.attempts += 1;
    connection.closeCode = code;
    connection.status = "disconnected";
    connection.retryAt = performance.now() + delay * 1000;
    drawConnection();
    window.setTimeout(connect, delay * 1000);
  }

  createCharts();
  setUpRanges();
  setUpRecent();
  render();
  connect();
  window.setInterval(render, 1000);
})();
