/* The dashboard's numbers, without the page: folds the messages of /ws/dashboard/
 * into per-second series for the live charts, per-minute series for the 24-hour
 * chart, and current figures for the totals and tables.
 *
 * Several proxy nodes each send a "tick" about once a second with the counts of
 * the interval since their previous tick. A tick's counts are spread over the
 * wall-clock seconds its interval covers, so that the nodes' ticks, which arrive
 * at unrelated fractions of a second, add up per second without gaps or double
 * seconds. Gauges (active connections) are the last value each node reported.
 *
 * Upstream targets are state, not counts: each tick carries its node's current
 * targets, and a target's health is per node (each node checks for itself), so
 * they are shown per node or as the worst current node, never summed.
 *
 * No DOM here: tests/js/ runs this file under node.
 */
(function (root, factory) {
  "use strict";
  if (typeof module === "object" && module.exports) {
    module.exports = factory();
  } else {
    root.ProxyDashboardModel = factory();
  }
})(this, function () {
  "use strict";

  const LIVE_WINDOW = 900; // seconds on the live charts and in the tables' counts
  const STALE_AFTER = 5; // seconds without a tick before a node's figures stop counting as current
  const MAX_INTERVAL = 5; // longest interval one tick is taken to cover (after a gap, less is known)
  const HISTORY_MINUTES = 1440;
  const STATUS_CLASSES = ["2xx", "3xx", "4xx", "5xx"];
  const COUNTERS = ["requests", "2xx", "3xx", "4xx", "5xx", "bytes_in", "bytes_out", "handshake_failures",
    "unauthorized", "denied", "rate_limited"];

  function number(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : 0;
  }

  function optionalNumber(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  function plainObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value) ? value : {};
  }

  function optionalString(value) {
    return typeof value === "string" && value ? value : null;
  }

  /** What the dashboard calls a target that takes no requests from this node. */
  function targetState(target) {
    return target.coolingDown ? "cooling down" : "down";
  }

  function readTarget(raw) {
    const target = plainObject(raw);
    return {
      address: String(target.address === undefined ? "?" : target.address),
      healthy: target.healthy === true,
      coolingDown: target.cooling_down === true,
      draining: target.draining === true,
      enabled: target.enabled !== false,
      active: number(target.active),
      lastError: optionalString(target.last_error),
      node: optionalString(target.node), // a process's tick sums its nodes: whose target this is
    };
  }

  /** A tick's upstreams: name -> {healthy, total, targets, retries} (retries: since the previous tick). */
  function readUpstreams(raw) {
    const upstreams = new Map();
    for (const [name, value] of Object.entries(plainObject(raw))) {
      const state = plainObject(value);
      upstreams.set(name, {
        healthy: number(state.healthy),
        available: number(state.available),
        total: number(state.total),
        retries: number(state.retries),
        targets: Array.isArray(state.targets) ? state.targets.map(readTarget) : [],
      });
    }
    return upstreams;
  }

  function zeroCounts() {
    const counts = {};
    for (const name of COUNTERS) counts[name] = 0;
    return counts;
  }

  function addCounts(into, from, factor) {
    for (const name of COUNTERS) into[name] += from[name] * factor;
  }

  function addTallies(into, from, factor) {
    for (const [key, value] of Object.entries(plainObject(from))) {
      into[key] = (into[key] || 0) + number(value) * factor;
    }
  }

  /** One node's tick reduced to what the model keeps: totals and per-host figures. */
  function readTick(tick) {
    const totals = zeroCounts();
    let active = 0;
    const hosts = new Map();
    for (const [host, raw] of Object.entries(plainObject(tick.hosts))) {
      const figures = plainObject(raw);
      const counts = zeroCounts();
      for (const name of COUNTERS) counts[name] = number(figures[name]);
      addCounts(totals, counts, 1);
      active += number(figures.active);
      hosts.set(host, {
        counts,
        active: number(figures.active),
        rps: optionalNumber(figures.rps),
        p50: optionalNumber(figures.p50_ms),
        p95: optionalNumber(figures.p95_ms),
        upstream: optionalString(figures.upstream),
      });
    }
    return { totals, active, hosts, upstreams: readUpstreams(tick.upstreams) };
  }

  function downTargets(node, state) {
    return state.targets.filter((t) => !t.healthy).map((t) => ({
      node: t.node || node, address: t.address, state: targetState(t), lastError: t.lastError,
    }));
  }

  /** The live window: per-second buckets summed over nodes, and each node's latest tick. */
  class LiveModel {
    constructor(options) {
      const opts = options || {};
      this.window = opts.window || LIVE_WINDOW;
      this.staleAfter = opts.staleAfter || STALE_AFTER;
      this.seconds = new Map(); // epoch second -> {counts, active: Map(node -> connections)}
      this.hostSeconds = new Map(); // host -> Map(epoch second -> counts)
      this.tlsSeconds = new Map(); // epoch second -> {versions, ciphers}
      this.latency = new Map(); // host -> Map(node -> {p50, p95, weight, time})
      this.nodes = new Map(); // node -> {time, received, interval, tick}
      this.hostUpstreams = new Map(); // node -> Map(host -> upstream), kept while the host is idle
      this.retrySeconds = new Map(); // upstream -> Map(epoch second -> retried requests)
      this.clockOffset = null; // server time minus local time, from the latest tick
      this.end = null; // last second shown on the charts (never moves back)
      this.tickCount = 0;
    }

    /**
     * Start from the control plane's memory of the window (the "live" part of "state",
     * proxyadmin/livehistory.py): per-second totals, per-host counts every few seconds,
     * TLS tallies, and each node's last tick, so that its next tick goes on from there
     * and none is counted twice. ``received`` is the local time (seconds) it arrived.
     */
    load(live, received) {
      const l = plainObject(live);
      const names = Array.isArray(l.counters) ? l.counters : COUNTERS;
      const counts = (row, from) => {
        const found = zeroCounts();
        names.forEach((name, i) => {
          if (COUNTERS.includes(name)) found[name] = number(row[from + i]);
        });
        return found;
      };
      const step = number(l.host_step) || 1;
      const rows = (value) => (Array.isArray(value) ? value.filter((r) => Array.isArray(r) && optionalNumber(r[0]) !== null) : []);
      // Only what the page has no figures for: after a reconnection it already has its own.
      for (const row of rows(l.seconds)) {
        if (this.seconds.has(row[0])) continue;
        const bucket = this.bucket(row[0]);
        addCounts(bucket.counts, counts(row, 1), 1);
        const active = optionalNumber(row[1 + names.length]);
        if (active !== null) bucket.active.set("", active); // summed over nodes already
      }
      for (const [host, steps] of Object.entries(plainObject(l.hosts))) {
        let perSecond = this.hostSeconds.get(host);
        if (!perSecond) this.hostSeconds.set(host, (perSecond = new Map()));
        const seen = [...perSecond.keys()];
        for (const row of rows(steps)) {
          if (!seen.some((second) => second >= row[0] && second < row[0] + step)) perSecond.set(row[0], counts(row, 1));
        }
      }
      for (const row of rows(l.tls)) {
        if (this.tlsSeconds.has(row[0])) continue;
        const tls = { versions: {}, ciphers: {} };
        addTallies(tls.versions, row[1], 1);
        addTallies(tls.ciphers, row[2], 1);
        this.tlsSeconds.set(row[0], tls);
      }
      for (const [node, time] of Object.entries(plainObject(l.nodes))) {
        if (optionalNumber(time) === null || this.nodes.has(node)) continue;
        // Not current (received long ago): it only marks where the node's next tick starts.
        this.nodes.set(node, { time, received: -Infinity, interval: 1, tick: readTick({}) });
      }
      const time = optionalNumber(l.time);
      if (time !== null && this.clockOffset === null) this.clockOffset = time - received;
    }

    /** Take one "tick" message; ``received`` is the local time (seconds) it arrived. */
    addTick(message, received) {
      const time = optionalNumber(message.time);
      if (time === null || typeof message.node !== "string") return false;
      const previous = this.nodes.get(message.node);
      if (previous && time <= previous.time) return false; // a repeat, or out of order
      // A node's first tick, or its first after a gap, is taken to cover the last second.
      const start = previous && time - previous.time <= MAX_INTERVAL ? previous.time : time - 1;
      const tick = readTick(message);
      const interval = time - start;
      this.nodes.set(message.node, { time, received, interval, tick });
      this.clockOffset = time - received;
      this.tickCount += 1;

      this.spread(start, time, (bucket, share) => addCounts(bucket.counts, tick.totals, share));
      for (let second = Math.floor(start) + 1; second <= Math.floor(time); second += 1) {
        this.bucket(second).active.set(message.node, tick.active);
      }
      const second = Math.floor(time);
      let hostUpstreams = this.hostUpstreams.get(message.node);
      if (!hostUpstreams) this.hostUpstreams.set(message.node, (hostUpstreams = new Map()));
      for (const [name, state] of tick.upstreams) {
        if (!state.retries) continue;
        let perSecond = this.retrySeconds.get(name);
        if (!perSecond) this.retrySeconds.set(name, (perSecond = new Map()));
        perSecond.set(second, (perSecond.get(second) || 0) + state.retries);
      }
      for (const [host, figures] of tick.hosts) {
        if (figures.upstream !== null) hostUpstreams.set(host, figures.upstream);
        let perSecond = this.hostSeconds.get(host);
        if (!perSecond) this.hostSeconds.set(host, (perSecond = new Map()));
        const counts = perSecond.get(second) || zeroCounts();
        addCounts(counts, figures.counts, 1);
        perSecond.set(second, counts);
        if (figures.p50 !== null || figures.p95 !== null) {
          let byNode = this.latency.get(host);
          if (!byNode) this.latency.set(host, (byNode = new Map()));
          byNode.set(message.node, {
            p50: figures.p50, p95: figures.p95, weight: Math.max(1, figures.counts.requests), time,
          });
        }
      }
      const tls = this.tlsSeconds.get(second) || { versions: {}, ciphers: {} };
      addTallies(tls.versions, message.tls_versions, 1);
      addTallies(tls.ciphers, message.ciphers, 1);
      this.tlsSeconds.set(second, tls);
      this.prune(time);
      return true;
    }

    bucket(second) {
      let bucket = this.seconds.get(second);
      if (!bucket) this.seconds.set(second, (bucket = { counts: zeroCounts(), active: new Map() }));
      return bucket;
    }

    /** Call ``add(bucket, share)`` for each second that (start, end] overlaps. */
    spread(start, end, add) {
      const length = end - start;
      for (let second = Math.floor(start); second < end; second += 1) {
        const overlap = Math.min(end, second + 1) - Math.max(start, second);
        if (overlap > 0) add(this.bucket(second), overlap / length);
      }
    }

    prune(now) {
      const oldest = Math.floor(now) - this.window - MAX_INTERVAL;
      for (const second of this.seconds.keys()) if (second < oldest) this.seconds.delete(second);
      for (const second of this.tlsSeconds.keys()) if (second < oldest) this.tlsSeconds.delete(second);
      for (const [host, perSecond] of this.hostSeconds) {
        for (const second of perSecond.keys()) if (second < oldest) perSecond.delete(second);
        if (perSecond.size === 0) this.hostSeconds.delete(host);
      }
      for (const [name, perSecond] of this.retrySeconds) {
        for (const second of perSecond.keys()) if (second < oldest) perSecond.delete(second);
        if (perSecond.size === 0) this.retrySeconds.delete(name);
      }
      for (const [host, byNode] of this.latency) {
        for (const [node, entry] of byNode) if (entry.time < oldest) byNode.delete(node);
        if (byNode.size === 0) this.latency.delete(host);
      }
    }

    /** Nodes whose latest tick arrived less than ``staleAfter`` seconds ago (local clock). */
    currentNodes(now) {
      const current = [];
      for (const [name, node] of this.nodes) if (now - node.received < this.staleAfter) current.push([name, node]);
      return current;
    }

    /** Last second whose buckets every current node has filled; moves forward only. */
    lastCompleteSecond(now) {
      const current = this.currentNodes(now);
      let end;
      if (current.length) {
        end = Math.floor(Math.min(...current.map(([, node]) => node.time))) - 1;
      } else if (this.clockOffset !== null) {
        end = Math.floor(now + this.clockOffset) - 1;
      } else {
        end = Math.floor(now) - 1;
      }
      if (this.end !== null && end < this.end) end = this.end;
      this.end = end;
      return end;
    }

    /** Per-second series over the live window, ``null`` where no node reported. */
    series(now) {
      const end = this.lastCompleteSecond(now);
      const out = { time: [], active: [], bytes_in: [], bytes_out: [], errors: [], requests: [] };
      for (const name of STATUS_CLASSES) out[name] = [];
      for (let second = end - this.window + 1; second <= end; second += 1) {
        out.time.push(second);
        const bucket = this.seconds.get(second);
        const counts = bucket ? bucket.counts : null;
        for (const name of [...STATUS_CLASSES, "requests", "bytes_in", "bytes_out"]) {
          out[name].push(counts ? counts[name] : null);
        }
        out.errors.push(counts ? counts["5xx"] + counts.handshake_failures : null);
        let active = null;
        if (bucket && bucket.active.size) {
          active = 0;
          for (const value of bucket.active.values()) active += value;
        }
        out.active.push(active);
      }
      return out;
    }

    /** Figures of the current nodes' latest ticks, per second. */
    totals(now) {
      const totals = { active: 0, rps: 0, bytes_in: 0, bytes_out: 0, errors: 0, requests: 0, nodes: 0 };
      for (const [, node] of this.currentNodes(now)) {
        const { tick, interval } = node;
        totals.nodes += 1;
        totals.active += tick.active;
        for (const figures of tick.hosts.values()) {
          totals.rps += figures.rps !== null ? figures.rps : figures.counts.requests / interval;
        }
        totals.bytes_in += tick.totals.bytes_in / interval;
        totals.bytes_out += tick.totals.bytes_out / interval;
        totals.errors += (tick.totals["5xx"] + tick.totals.handshake_failures) / interval;
      }
      const since = this.windowStart(now);
      for (const [second, bucket] of this.seconds) if (second >= since) totals.requests += bucket.counts.requests;
      totals.requests = Math.round(totals.requests);
      return totals;
    }

    windowStart(now) {
      const latest = this.clockOffset === null ? now : now + this.clockOffset;
      return Math.floor(latest) - this.window + 1;
    }

    /** One row per host seen in the live window: current rates, counts over the window, latency. */
    hosts(now) {
      const since = this.windowStart(now);
      const rows = new Map();
      const row = (host) => {
        if (!rows.has(host)) {
          rows.set(host, { host, rps: 0, active: 0, counts: zeroCounts(), p50: null, p95: null });
        }
        return rows.get(host);
      };
      for (const [host, perSecond] of this.hostSeconds) {
        for (const [second, counts] of perSecond) if (second >= since) addCounts(row(host).counts, counts, 1);
      }
      for (const [, node] of this.currentNodes(now)) {
        for (const [host, figures] of node.tick.hosts) {
          const r = row(host);
          r.rps += figures.rps !== null ? figures.rps : figures.counts.requests / node.interval;
          r.active += figures.active;
        }
      }
      for (const [host, byNode] of this.latency) {
        if (!rows.has(host)) continue;
        // Percentiles do not add up across nodes: p50 is their request-weighted mean,
        // p95 the worst node's, which errs on the side of showing a slow host.
        let weighted = 0;
        let weights = 0;
        let worst = null;
        for (const entry of byNode.values()) {
          if (entry.p50 !== null) {
            weighted += entry.p50 * entry.weight;
            weights += entry.weight;
          }
          if (entry.p95 !== null && (worst === null || entry.p95 > worst)) worst = entry.p95;
        }
        const r = rows.get(host);
        r.p50 = weights ? weighted / weights : null;
        r.p95 = worst;
      }
      for (const r of rows.values()) r.targets = this.hostTargets(r.host, now);
      return [...rows.values()].sort((a, b) => b.counts.requests - a.counts.requests || (a.host < b.host ? -1 : 1));
    }

    /**
     * A host's upstream targets over the current nodes: the fewest healthy on any
     * node, the most targets, and every target some node finds down; null when no
     * current node has said which upstream the host uses.
     */
    hostTargets(host, now) {
      let found = null;
      for (const [node, entry] of this.currentNodes(now)) {
        const name = (this.hostUpstreams.get(node) || new Map()).get(host);
        const state = name === undefined ? undefined : entry.tick.upstreams.get(name);
        if (!state) continue;
        if (!found) found = { upstream: name, healthy: state.healthy, total: state.total, down: [] };
        found.healthy = Math.min(found.healthy, state.healthy);
        found.total = Math.max(found.total, state.total);
        found.down.push(...downTargets(node, state));
      }
      return found;
    }

    /** One row per upstream the current nodes report: targets per node, retries over the window. */
    upstreams(now) {
      const since = this.windowStart(now);
      const rows = new Map();
      const row = (name) => {
        if (!rows.has(name)) rows.set(name, { name, nodes: [], retries: 0, down: [] });
        return rows.get(name);
      };
      for (const [node, entry] of this.currentNodes(now).sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
        for (const [name, state] of entry.tick.upstreams) {
          const r = row(name);
          r.nodes.push({ node, healthy: state.healthy, total: state.total });
          r.down.push(...downTargets(node, state));
        }
      }
      for (const [name, perSecond] of this.retrySeconds) {
        for (const [second, n] of perSecond) if (second >= since) row(name).retries += n;
      }
      return [...rows.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
    }

    /** TLS versions and ciphers seen in the live window, most frequent first. */
    tls(now) {
      const since = this.windowStart(now);
      const versions = {};
      const ciphers = {};
      for (const [second, tallies] of this.tlsSeconds) {
        if (second < since) continue;
        addTallies(versions, tallies.versions, 1);
        addTallies(ciphers, tallies.ciphers, 1);
      }
      const sorted = (tallies) => Object.entries(tallies).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
      return { versions: sorted(versions), ciphers: sorted(ciphers) };
    }
  }

  /** The 24-hour chart: per-minute counts from the "state" message, plus live ticks. */
  class HistoryModel {
    constructor() {
      this.minutes = new Map(); // epoch minute start (seconds) -> counts
      this.first = null;
    }

    load(history) {
      this.minutes.clear();
      this.first = null;
      const h = plainObject(history);
      const minutes = Array.isArray(h.minutes) ? h.minutes : [];
      const column = (name, i) => (Array.isArray(h[name]) ? number(h[name][i]) : 0);
      minutes.forEach((minute, i) => {
        if (typeof minute !== "number" || !Number.isFinite(minute)) return;
        const counts = this.minute(minute);
        counts.requests += column("requests", i);
        counts.bytes_in += column("bytes_in", i);
        counts.bytes_out += column("bytes_out", i);
        counts["5xx"] += column("errors_5xx", i);
        counts.handshake_failures += column("handshake_failures", i);
      });
    }

    minute(time) {
      const start = Math.floor(time / 60) * 60;
      let counts = this.minutes.get(start);
      if (!counts) this.minutes.set(start, (counts = zeroCounts()));
      if (this.first === null || start < this.first) this.first = start;
      return counts;
    }

    addTick(message) {
      const time = optionalNumber(message.time);
      if (time === null) return;
      addCounts(this.minute(time), readTick(message).totals, 1);
      const oldest = Math.floor(time / 60) * 60 - HISTORY_MINUTES * 60;
      for (const start of this.minutes.keys()) if (start <= oldest) this.minutes.delete(start);
      if (this.first !== null && this.first <= oldest) this.first = oldest + 60;
    }

    /** Per-minute series over the ``minutes`` (24 hours by default) to ``now`` (server seconds); zero after the first record. */
    series(now, minutes) {
      const span = Math.min(HISTORY_MINUTES, minutes || HISTORY_MINUTES);
      const end = Math.floor(now / 60) * 60;
      const out = { time: [], requests: [], errors: [], bytes_in: [], bytes_out: [] };
      for (let start = end - (span - 1) * 60; start <= end; start += 60) {
        out.time.push(start);
        const counts = this.minutes.get(start) || (this.first !== null && start >= this.first ? zeroCounts() : null);
        out.requests.push(counts ? counts.requests : null);
        out.errors.push(counts ? counts["5xx"] + counts.handshake_failures : null);
        out.bytes_in.push(counts ? counts.bytes_in : null);
        out.bytes_out.push(counts ? counts.bytes_out : null);
      }
      return out;
    }
  }

  /** Running sums of ``columns`` (bottom first), for stacked area charts; null stays null. */
  function stack(columns) {
    const stacked = [];
    let below = null;
    for (const column of columns) {
      const sums = column.map((value, i) => {
        if (value === null) return below ? below[i] : null;
        return (below && below[i] !== null ? below[i] : 0) + value;
      });
      stacked.push(sums);
      below = sums;
    }
    return stacked;
  }

  return { LiveModel, HistoryModel, stack, readTick, STATUS_CLASSES, LIVE_WINDOW, HISTORY_MINUTES };
});
