// The dashboard's aggregation of node ticks (proxyadmin/static/proxyadmin/dashboard-model.js).
// Run by tests/test_dashboard_page.py, or alone with `npm test`.
"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");

const { LiveModel, HistoryModel, stack } = require(
  path.join(__dirname, "..", "..", "proxyadmin", "static", "proxyadmin", "dashboard-model.js"),
);

function tick(node, time, hosts, extra) {
  return { type: "tick", node, time, hosts, tls_versions: {}, ciphers: {}, ...extra };
}

function host(fields) {
  return {
    requests: 0, rps: 0, active: 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0,
    bytes_in: 0, bytes_out: 0, handshake_failures: 0, p50_ms: null, p95_ms: null, ...fields,
  };
}

function at(series, second, column) {
  return series[column][series.time.indexOf(second)];
}

test("ticks of two nodes add up per second", () => {
  const model = new LiveModel();
  for (let t = 100; t <= 104; t += 1) {
    model.addTick(tick("a", t + 0.25, { web: host({ requests: 10, "2xx": 10, active: 2 }) }), t + 0.3);
    model.addTick(tick("b", t + 0.75, { web: host({ requests: 4, "5xx": 4, active: 3 }) }), t + 0.8);
  }
  const series = model.series(105);
  assert.equal(series.time.at(-1), 103); // the last second both nodes have covered
  assert.ok(Math.abs(at(series, 102, "requests") - 14) < 1e-9);
  assert.ok(Math.abs(at(series, 102, "2xx") - 10) < 1e-9);
  assert.ok(Math.abs(at(series, 102, "5xx") - 4) < 1e-9);
  assert.ok(Math.abs(at(series, 102, "errors") - 4) < 1e-9);
  assert.equal(at(series, 102, "active"), 5);
  assert.equal(at(series, 50, "requests"), null); // before any node reported
});

test("a tick is spread over the seconds its interval covers", () => {
  const model = new LiveModel();
  model.addTick(tick("a", 10.5, { web: host({}) }), 10.5);
  model.addTick(tick("a", 11.5, { web: host({ requests: 10, bytes_in: 1000 }) }), 11.5);
  assert.ok(Math.abs(model.seconds.get(10).counts.requests - 5) < 1e-9);
  assert.ok(Math.abs(model.seconds.get(11).counts.requests - 5) < 1e-9);
  assert.ok(Math.abs(model.seconds.get(11).counts.bytes_in - 500) < 1e-9);
  // A repeated tick is not counted twice.
  assert.equal(model.addTick(tick("a", 11.5, { web: host({ requests: 10 }) }), 11.6), false);
});

test("totals are the current nodes' latest ticks; a silent node stops counting", () => {
  const model = new LiveModel({ staleAfter: 5 });
  model.addTick(tick("a", 200, { web: host({ requests: 3, rps: 3, active: 7, "5xx": 1, handshake_failures: 2,
                                             bytes_in: 100, bytes_out: 900 }) }), 1000);
  model.addTick(tick("b", 200.5, { api: host({ requests: 2, rps: 2, active: 1 }) }), 1000.5);
  let totals = model.totals(1001);
  assert.equal(totals.nodes, 2);
  assert.equal(totals.active, 8);
  assert.equal(totals.rps, 5);
  assert.equal(totals.errors, 3);
  assert.equal(totals.bytes_out, 900);
  assert.equal(totals.requests, 5);
  totals = model.totals(1005.2); // a went quiet more than 5 s ago, b did not
  assert.equal(totals.nodes, 1);
  assert.equal(totals.active, 1);
});

test("the host table sums nodes and combines their latencies", () => {
  const model = new LiveModel();
  model.addTick(tick("a", 300, { web: host({ requests: 30, "2xx": 29, "4xx": 1, p50_ms: 10, p95_ms: 40, active: 2 }),
                                 "-": host({ handshake_failures: 3 }) }), 300);
  model.addTick(tick("b", 300.2, { web: host({ requests: 10, "2xx": 10, p50_ms: 30, p95_ms: 90, active: 1 }) }), 300.2);
  const rows = model.hosts(300.5);
  assert.deepEqual(rows.map((r) => r.host), ["web", "-"]);
  const [web, unmatched] = rows;
  assert.equal(web.counts.requests, 40);
  assert.equal(web.counts["2xx"], 39);
  assert.equal(web.active, 3);
  assert.equal(web.p50, (10 * 30 + 30 * 10) / 40);
  assert.equal(web.p95, 90);
  assert.equal(unmatched.counts.handshake_failures, 3);
  assert.equal(unmatched.p50, null);
});

test("TLS versions and ciphers are tallied over the window", () => {
  const model = new LiveModel();
  model.addTick(tick("a", 400, {}, { tls_versions: { "TLSv1.3": 2 }, ciphers: { TLS_AES_128_GCM_SHA256: 2 } }), 400);
  model.addTick(tick("b", 400.5, {}, { tls_versions: { "TLSv1.3": 1, "TLSv1.2": 5 } }), 400.5);
  const tls = model.tls(401);
  assert.deepEqual(tls.versions, [["TLSv1.2", 5], ["TLSv1.3", 3]]);
  assert.deepEqual(tls.ciphers, [["TLS_AES_128_GCM_SHA256", 2]]);
});

test("the 24-hour history takes the state, then live ticks into the current minute", () => {
  const history = new HistoryModel();
  history.load({ minutes: [6000, 6120], requests: [5, 7], bytes_in: [1, 2], bytes_out: [3, 4],
                 errors_5xx: [1, 0], handshake_failures: [0, 2] });
  history.addTick(tick("a", 6130, { web: host({ requests: 3, "5xx": 1 }) }));
  const series = history.series(6130);
  assert.equal(series.time.length, 1440);
  assert.equal(series.time.at(-1), 6120);
  assert.equal(at(series, 6120, "requests"), 10);
  assert.equal(at(series, 6120, "errors"), 3);
  assert.equal(at(series, 6060, "requests"), 0); // a minute with no record after the first one
  assert.equal(at(series, 5940, "requests"), null); // before the first record
});

test("stacking keeps gaps", () => {
  assert.deepEqual(stack([[1, null, 2], [3, null, null]]), [[1, null, 2], [4, null, 2]]);
});

function app(healthyFlags, extra) {
  const targets = healthyFlags.map((healthy, i) => ({
    address: "10.0.0." + (i + 1) + ":80", healthy, cooling_down: false, active: 0, weight: 1,
    draining: false, enabled: true, last_error: healthy ? null : "connection refused",
  }));
  const healthy = healthyFlags.filter(Boolean).length;
  return { app: { targets, healthy, available: healthy, total: targets.length, retries: 0, ...extra } };
}

test("a host's targets are the worst current node's healthy over the total, with the down ones", () => {
  const model = new LiveModel({ staleAfter: 5 });
  const web = (fields) => host({ upstream: "app", targets_healthy: 0, targets_total: 3, ...fields });
  model.addTick(tick("a", 500, { web: web({ requests: 1 }) }, { upstreams: app([true, true, true]) }), 500);
  model.addTick(tick("b", 500.2, { web: web({ requests: 1 }) }, { upstreams: app([true, false, true]) }), 500.2);
  let [row] = model.hosts(500.5);
  assert.equal(row.targets.upstream, "app");
  assert.equal(row.targets.healthy, 2);
  assert.equal(row.targets.total, 3);
  assert.deepEqual(row.targets.down, [
    { node: "b", address: "10.0.0.2:80", state: "down", lastError: "connection refused" },
  ]);
  // An idle host keeps its upstream; once b goes quiet, only a counts.
  model.addTick(tick("a", 504, {}, { upstreams: app([true, true, true]) }), 504);
  [row] = model.hosts(506);
  assert.equal(row.targets.healthy, 3);
  assert.deepEqual(row.targets.down, []);
});

test("the upstream table lists targets per node and sums retries over the window", () => {
  const model = new LiveModel({ staleAfter: 5 });
  model.addTick(tick("b", 600, {}, { upstreams: app([true, false], { retries: 2 }) }), 600);
  model.addTick(tick("a", 600.5, {}, { upstreams: app([true, true], { retries: 1 }) }), 600.5);
  model.addTick(tick("a", 601.5, {}, { upstreams: app([true, true], { retries: 4 }) }), 601.5);
  const [row] = model.upstreams(602);
  assert.equal(row.name, "app");
  assert.deepEqual(row.nodes, [{ node: "a", healthy: 2, total: 2 }, { node: "b", healthy: 1, total: 2 }]);
  assert.equal(row.retries, 7);
  assert.equal(row.down.length, 1);
  assert.equal(row.down[0].lastError, "connection refused");
  assert.deepEqual(new LiveModel().upstreams(0), []);
});

test("a page opened after traffic starts from the control plane's window, and counts no tick twice", () => {
  const live = {
    time: 1010.2, window: 900, host_step: 10,
    counters: ["requests", "2xx", "3xx", "4xx", "5xx", "bytes_in", "bytes_out", "handshake_failures"],
    seconds: [[1008, 6, 6, 0, 0, 0, 60, 600, 0, 2], [1009, 4, 3, 0, 0, 1, 40, 400, 0, 2]],
    hosts: { web: [[1000, 10, 9, 0, 0, 1, 100, 1000, 0]] },
    tls: [[1000, { "TLSv1.3": 3 }, {}]],
    nodes: { a: 1009.5 },
  };
  const model = new LiveModel();
  model.load(live, 1010.2);
  assert.equal(model.totals(1010.2).requests, 10);
  assert.equal(model.totals(1010.2).nodes, 0); // the loaded node is not a current one
  assert.deepEqual(model.hosts(1010.2).map((r) => [r.host, r.counts.requests, r.counts["5xx"]]), [["web", 10, 1]]);
  assert.equal(at(model.series(1010.2), 1009, "active"), 2);
  assert.deepEqual(model.tls(1010.2).versions, [["TLSv1.3", 3]]);
  // A tick the window already holds is refused; the next one goes on from it.
  assert.equal(model.addTick(tick("a", 1009.5, { web: host({ requests: 4 }) }), 1010.3), false);
  assert.equal(model.addTick(tick("a", 1010.5, { web: host({ requests: 2, "2xx": 2 }) }), 1010.6), true);
  assert.ok(Math.abs(model.seconds.get(1009).counts.requests - 5) < 1e-9); // 4 loaded + half of 2
  assert.equal(model.totals(1010.6).requests, 12);
  // Loading the same window again (a reconnection) adds nothing the page already has.
  model.load(live, 1011);
  assert.equal(model.totals(1011).requests, 12);
  assert.equal(model.hosts(1011)[0].counts.requests, 12);
});

test("a control plane's tick names the node behind each down target", () => {
  const model = new LiveModel({ staleAfter: 5 });
  const upstreams = app([true, false]);
  for (const target of upstreams.app.targets) target.node = "edge-7";
  const web = host({ upstream: "app", targets_healthy: 1, targets_total: 2, requests: 1 });
  model.addTick(tick("control plane cp1:42", 700, { web }, { upstreams }), 700);
  const [row] = model.hosts(700.5);
  assert.deepEqual(row.targets.down.map((t) => t.node), ["edge-7"]);
});
