// Unit tests of web/link-counter.js in Node: a fake WebSocket, fake timers
// and a fixed Math.random make reconnection and backoff deterministic.
// Run by run.mjs before the browser steps (or alone: node unit.mjs).

import assert from "node:assert/strict";

import { DEFAULT_BACKOFF, LinkCounter, pageIdFromUrl, pageIdProblem, roomUrl } from "../../web/link-counter.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code) {
    this.closedWith = code;
  }
  // Driven by the test, as the server would:
  serverOpen() {
    this.onopen?.({});
  }
  serverSend(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  serverClose(code, reason = "") {
    this.onclose?.({ code, reason });
  }
}

/** Replaces setTimeout/clearTimeout/Math.random while `fn` runs. */
async function withFakeTime(fn) {
  const real = { setTimeout: globalThis.setTimeout, clearTimeout: globalThis.clearTimeout, random: Math.random };
  const timers = new Map();
  let next = 1;
  const clock = {
    random: 0.5,
    timers,
    /** Delays of the pending timers, in creation order. */
    delays: () => [...timers.values()].map((t) => t.delay),
    /** Runs the pending timer with this delay (or the only/first one). */
    fire(delay) {
      const entry = [...timers.entries()].find(([, t]) => delay === undefined || t.delay === delay);
      assert.ok(entry, `a timer with delay ${delay} is pending: ${JSON.stringify(clock.delays())}`);
      timers.delete(entry[0]);
      entry[1].fn();
    },
  };
  globalThis.setTimeout = (fn, delay) => {
    timers.set(next, { fn, delay });
    return next++;
  };
  globalThis.clearTimeout = (id) => timers.delete(id);
  Math.random = () => clock.random;
  try {
    await fn(clock);
  } finally {
    Object.assign(globalThis, { setTimeout: real.setTimeout, clearTimeout: real.clearTimeout });
    Math.random = real.random;
  }
}

function quietLogger() {
  const lines = { warn: [], error: [] };
  return { lines, warn: (...a) => lines.warn.push(a.join(" ")), error: (...a) => lines.error.push(a.join(" ")) };
}

function newCounter(extra = {}) {
  FakeSocket.all = [];
  const updates = [];
  const logger = quietLogger();
  const counter = new LinkCounter({
    host: "http://h:1",
    page: "%2Fpages%2Fa",
    links: ["b", "c"],
    WebSocket: FakeSocket,
    logger,
    onUpdate: (counts, info) => updates.push({ counts: Object.fromEntries(counts), ...info }),
    ...extra,
  });
  return { counter, updates, logger, socket: () => FakeSocket.all.at(-1) };
}

const tests = {
  "ids are the path, decoded, then encoded as one segment"() {
    const base = "https://site.example/x/y";
    assert.equal(pageIdFromUrl("/pages/b?q=1#top", base), "%2Fpages%2Fb");
    assert.equal(pageIdFromUrl("https://site.example/pages/b", base), "%2Fpages%2Fb");
    assert.equal(pageIdFromUrl("/café/", base), "%2Fcaf%C3%A9%2F");
    assert.equal(pageIdFromUrl("/caf%c3%a9/", base), "%2Fcaf%C3%A9%2F");
    assert.equal(pageIdFromUrl("/a b", base), "%2Fa%20b");
    assert.equal(pageIdFromUrl("/100%", base), "%2F100%25");
    assert.equal(pageIdFromUrl("b", base), "%2Fx%2Fb");
    assert.equal(pageIdFromUrl("/", base), "%2F");
    assert.equal(pageIdFromUrl(`/${"x".repeat(300)}`, base), null);
    assert.equal(pageIdProblem("a/b"), 'contains "/"');
    assert.equal(pageIdProblem("a\nb"), "contains a control character");
    assert.equal(pageIdProblem(""), "is empty");
    assert.equal(pageIdProblem("%2Fpages%2Fb"), null);
  },

  "the room URL percent-encodes the id once more"() {
    assert.equal(roomUrl("http://h:1", "%2Fpages%2Fb"), "ws://h:1/parties/page/%252Fpages%252Fb");
    assert.equal(roomUrl("https://counts.example", "a b"), "wss://counts.example/parties/page/a%20b");
    assert.equal(roomUrl("counts.example", "a"), "wss://counts.example/parties/page/a");
  },

  async "subscribes on open and applies updates as set-these-ids"() {
    await withFakeTime(() => {
      const { counter, updates, socket } = newCounter();
      assert.equal(socket().url, "ws://h:1/parties/page/%252Fpages%252Fa");
      assert.equal(counter.state, "connecting");
      assert.equal(counter.get("b"), null);
      socket().serverOpen();
      assert.deepEqual(socket().sent, [{ type: "subscribe", links: ["b", "c"] }]);
      socket().serverSend({ type: "update", connections: { b: 2, c: 0 } });
      socket().serverSend({ type: "update", connections: { c: 5, zzz: 9 } }); // zzz is not followed
      assert.deepEqual(Object.fromEntries(counter.counts), { b: 2, c: 5 });
      assert.deepEqual(updates.at(-1), { counts: { b: 2, c: 5 }, connected: true, changed: ["c"] });
    });
  },

  async "setLinks re-subscribes on the same connection"() {
    await withFakeTime(() => {
      const { counter, socket } = newCounter();
      socket().serverOpen();
      socket().serverSend({ type: "update", connections: { b: 2, c: 1 } });
      counter.setLinks(["c", "d", "d"]);
      assert.equal(FakeSocket.all.length, 1);
      assert.deepEqual(socket().sent.at(-1), { type: "subscribe", links: ["c", "d"] });
      assert.deepEqual(Object.fromEntries(counter.counts), { c: 1, d: null });
      socket().serverSend({ type: "update", connections: { c: 1, d: 4, b: 7 } });
      assert.deepEqual(Object.fromEntries(counter.counts), { c: 1, d: 4 });
    });
  },

  async "counts become unknown on disconnect and the subscribe is sent again"() {
    await withFakeTime((clock) => {
      const { counter, updates, socket } = newCounter();
      socket().serverOpen();
      socket().serverSend({ type: "update", connections: { b: 2, c: 1 } });
      socket().serverClose(1006);
      assert.equal(counter.state, "waiting");
      assert.deepEqual(updates.at(-1), { counts: { b: null, c: null }, connected: false, changed: ["b", "c"] });
      clock.fire(DEFAULT_BACKOFF.base * clock.random);
      assert.equal(FakeSocket.all.length, 2);
      socket().serverOpen();
      assert.deepEqual(socket().sent, [{ type: "subscribe", links: ["b", "c"] }]);
    });
  },

  async "backoff: full jitter, doubling to the cap, reset after a stable connection"() {
    await withFakeTime((clock) => {
      const { base, cap, stableAfter } = DEFAULT_BACKOFF;
      const { socket } = newCounter();
      clock.random = 0.999;
      const ceilings = [];
      for (let i = 0; i < 8; i++) {
        socket().serverClose(1006); // refused before opening
        const [delay] = clock.delays();
        ceilings.push(Math.round(delay / clock.random));
        clock.fire(delay);
      }
      assert.deepEqual(ceilings, [base, 2 * base, 4 * base, 8 * base, 16 * base, cap, cap, cap]);
      // Jitter: the delay is uniform in [0, ceiling).
      clock.random = 0.25;
      socket().serverClose(1006);
      assert.deepEqual(clock.delays(), [cap * 0.25]);
      clock.fire();
      // A connection that stays open for stableAfter resets the attempts...
      socket().serverOpen();
      assert.deepEqual(clock.delays(), [stableAfter]);
      clock.fire(stableAfter);
      socket().serverClose(1006);
      assert.deepEqual(clock.delays(), [base * 0.25]);
      clock.fire();
      // ...one that closes sooner does not.
      socket().serverOpen();
      socket().serverClose(1006);
      assert.deepEqual(clock.delays(), [2 * base * 0.25]);
    });
  },

  async "close 1001 reconnects soon, whatever the earlier failures"() {
    await withFakeTime((clock) => {
      const { base } = DEFAULT_BACKOFF;
      const { socket } = newCounter();
      for (let i = 0; i < 5; i++) {
        socket().serverClose(1006);
        clock.fire();
      }
      socket().serverOpen();
      socket().serverClose(1001, "server shutting down");
      const pending = clock.delays().filter((d) => d !== DEFAULT_BACKOFF.stableAfter);
      assert.deepEqual(pending, [base * clock.random]);
    });
  },

  async "close 1008 stops and tells the console why"() {
    await withFakeTime((clock) => {
      const { counter, logger, socket } = newCounter();
      socket().serverOpen();
      socket().serverSend({ type: "update", connections: { b: 2, c: 1 } });
      socket().serverClose(1008, "origin not allowed");
      assert.equal(counter.state, "stopped");
      assert.deepEqual(clock.delays(), []);
      assert.equal(counter.get("b"), null);
      assert.match(logger.lines.error.join("\n"), /1008: origin not allowed/);
    });
  },

  async "server errors are logged, not fatal; close() stops for good"() {
    await withFakeTime((clock) => {
      const { counter, logger, socket } = newCounter();
      socket().serverOpen();
      socket().serverSend({ type: "error", code: "too_many_links", message: "at most 256" });
      assert.match(logger.lines.warn.join("\n"), /too_many_links/);
      assert.equal(counter.state, "open");
      counter.close();
      assert.equal(socket().closedWith, 1000);
      assert.equal(counter.state, "stopped");
      assert.deepEqual(clock.delays(), []);
    });
  },

  async "at most 256 links are followed; invalid ids are skipped"() {
    await withFakeTime(() => {
      const ids = Array.from({ length: 300 }, (_, i) => `p${i}`);
      const { counter, logger } = newCounter({ links: ["a/b", ...ids] });
      assert.equal(counter.links.length, 256);
      assert.match(logger.lines.warn.join("\n"), /a\/b/);
      assert.match(logger.lines.warn.join("\n"), /first 256/);
    });
  },
};

export async function runUnitTests() {
  for (const [name, fn] of Object.entries(tests)) {
    try {
      await fn();
    } catch (e) {
      e.message = `link-counter.js unit test "${name}": ${e.message}`;
      throw e;
    }
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  await runUnitTests();
  console.log(`ok: ${Object.keys(tests).length} unit tests`);
}
