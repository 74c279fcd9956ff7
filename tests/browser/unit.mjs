// Unit tests of web/link-counter.js in Node: a fake WebSocket, fake timers
// and a fixed Math.random make reconnection and backoff deterministic.
// Run by run.mjs before the browser steps (or alone: node unit.mjs).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  DEFAULT_BACKOFF,
  FALLBACK_AFTER,
  LinkCounter,
  TAB_CHANNEL,
  TabGroup,
  isAutomated,
  newVisitorId,
  originCheckUrl,
  pageIdFromUrl,
  pageIdProblem,
  pageLoadVisitorId,
  parseAwayAfter,
  eventsUrl,
  roomUrl,
  serviceBase,
} from "../../web/link-counter.js";

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

/** A fake EventSource, driven by the test as the server would. */
class FakeEventSource {
  static all = [];
  constructor(url) {
    this.url = url;
    this.closed = false;
    FakeEventSource.all.push(this);
  }
  close() {
    this.closed = true;
  }
  serverOpen() {
    this.onopen?.({});
  }
  serverSend(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  /** The stream failed (a refusal, or the connection ended). */
  serverFail() {
    this.onerror?.({});
  }
}

/** Runs the pending timer with the longest delay (the next WebSocket try). */
function fireLongest(clock) {
  const longest = Math.max(...clock.delays());
  clock.fire(longest);
  return longest;
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

/**
 * A fake fetch for the origin check: records each request and answers with
 * what `answer()` returns (an object: JSON with status 200; an Error: a
 * network failure; a number: that status, no JSON), after the test says so.
 */
function fakeFetch(answer = () => ({ origin: "https://site.example", allowed: true })) {
  const calls = [];
  const fetch = (url, init) =>
    new Promise((resolve, reject) => {
      calls.push({
        url,
        init,
        settle() {
          const a = answer();
          if (a instanceof Error) reject(a);
          else if (typeof a === "number") resolve({ ok: a < 300, status: a, json: async () => JSON.parse("<html>") });
          else resolve({ ok: true, status: 200, json: async () => a });
        },
      });
    });
  return { fetch, calls };
}

/** Lets settled promises run their continuations (the fake timers do not touch microtasks). */
const flush = () => new Promise((r) => setImmediate(r));

/**
 * An in-memory BroadcastChannel bus: channels of one bus see each other's
 * messages (not their own), delivered only when the test calls `deliver()`,
 * so a test decides which messages cross.
 */
function fakeBus() {
  const queue = [];
  const open = new Set();
  class Channel {
    constructor(name) {
      this.name = name;
      this.onmessage = null;
      open.add(this);
    }
    postMessage(data) {
      for (const other of open) if (other !== this && other.name === this.name) queue.push([other, structuredClone(data)]);
    }
    close() {
      open.delete(this);
    }
  }
  return {
    Channel,
    queue,
    /** Delivers every queued message (and those they cause) until none is left. */
    deliver() {
      while (queue.length) {
        const [to, data] = queue.shift();
        if (open.has(to)) to.onmessage?.({ data });
      }
    },
  };
}

/**
 * A counter on a fake socket. Unless a test says otherwise it counts
 * connections with no visitor id: the plain wire form (what a PartySocket
 * client sends and gets); the visitor tests below set `count` and `visitor`.
 */
function newCounter(extra = {}) {
  FakeSocket.all = [];
  const updates = [];
  const logger = quietLogger();
  const checks = fakeFetch();
  const counter = new LinkCounter({
    host: "http://h:1",
    page: "%2Fpages%2Fa",
    links: ["b", "c"],
    count: "connections",
    visitor: null,
    WebSocket: FakeSocket,
    fetch: checks.fetch,
    logger,
    onUpdate: (counts, info) => updates.push({ counts: Object.fromEntries(counts), ...info }),
    ...extra,
  });
  return { counter, updates, logger, checks, socket: () => FakeSocket.all.at(-1) };
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

  "index.html and index.htm are their directory, unless keepIndex"() {
    const base = "https://site.example/x/y";
    assert.equal(pageIdFromUrl("/docs/index.html", base), "%2Fdocs%2F");
    assert.equal(pageIdFromUrl("/docs/index.htm?x=1#top", base), "%2Fdocs%2F");
    assert.equal(pageIdFromUrl("/docs/index%2Ehtml", base), "%2Fdocs%2F"); // decoded first
    assert.equal(pageIdFromUrl("/index.html", base), "%2F");
    assert.equal(pageIdFromUrl("/index.html", base), pageIdFromUrl("/", base));
    assert.equal(pageIdFromUrl("index.html", "https://site.example/docs/a"), "%2Fdocs%2F");
    // Everything else stays as it was: only a last segment that is exactly one of the two.
    assert.equal(pageIdFromUrl("/docs/", base), "%2Fdocs%2F");
    assert.equal(pageIdFromUrl("/docs", base), "%2Fdocs");
    assert.equal(pageIdFromUrl("/docs/index.html/", base), "%2Fdocs%2Findex.html%2F");
    assert.equal(pageIdFromUrl("/docs/myindex.html", base), "%2Fdocs%2Fmyindex.html");
    assert.equal(pageIdFromUrl("/docs/index.php", base), "%2Fdocs%2Findex.php");
    assert.equal(pageIdFromUrl("/docs/Index.HTML", base), "%2Fdocs%2FIndex.HTML");
    assert.equal(pageIdFromUrl("/index.html.bak", base), "%2Findex.html.bak");
    // The opt-out (data-keep-index on the script tag).
    assert.equal(pageIdFromUrl("/docs/index.html", base, { keepIndex: true }), "%2Fdocs%2Findex.html");
    assert.equal(pageIdFromUrl("/index.htm", base, { keepIndex: true }), "%2Findex.htm");
    assert.equal(pageIdFromUrl("/docs/", base, { keepIndex: true }), "%2Fdocs%2F");
  },

  "the service base keeps a path prefix; every URL goes under it"() {
    assert.equal(serviceBase("https://counts.example"), "https://counts.example");
    assert.equal(serviceBase("https://counts.example/"), "https://counts.example");
    assert.equal(serviceBase("https://counts.example/presence"), "https://counts.example/presence");
    assert.equal(serviceBase("https://counts.example/presence/?x=1#y"), "https://counts.example/presence");
    assert.equal(serviceBase("wss://counts.example/a/b/"), "https://counts.example/a/b");
    assert.equal(serviceBase("ws://h:1/p"), "http://h:1/p");
    assert.equal(serviceBase("counts.example:8080/presence"), "https://counts.example:8080/presence");
    assert.equal(serviceBase("/presence/", "http://site.example:81/docs/a.html"), "http://site.example:81/presence");
    assert.equal(serviceBase("//other.example/p", "http://site.example/"), "http://other.example/p");
    // The embed's default: the folder the script was loaded from.
    assert.equal(
      serviceBase(new URL(".", "https://h.example/presence/link-counter.js?v=2").href),
      "https://h.example/presence",
    );
    assert.equal(serviceBase(new URL(".", "https://h.example/link-counter.js").href), "https://h.example");
    assert.throws(() => serviceBase("/presence", undefined), /link-counter: host "\/presence"/);
    assert.equal(roomUrl("https://h.example/presence/", "%2Fa"), "wss://h.example/presence/parties/page/%252Fa");
    assert.equal(roomUrl("http://h:1/p", "a"), "ws://h:1/p/parties/page/a");
    assert.equal(originCheckUrl("https://h.example/presence/"), "https://h.example/presence/api/v1/origin");
    assert.equal(originCheckUrl("counts.example"), "https://counts.example/api/v1/origin");
  },

  "the room URL percent-encodes the id once more"() {
    assert.equal(roomUrl("http://h:1", "%2Fpages%2Fb"), "ws://h:1/parties/page/%252Fpages%252Fb");
    assert.equal(roomUrl("https://counts.example", "a b"), "wss://counts.example/parties/page/a%20b");
    assert.equal(roomUrl("counts.example", "a"), "wss://counts.example/parties/page/a");
  },

  async "a refused origin: one console.error naming it and the setting, then slow retries"() {
    await withFakeTime(async (clock) => {
      const { base, refused } = DEFAULT_BACKOFF;
      const checks = fakeFetch(() => ({ origin: "https://site.example", allowed: false, setting: "security.allowed_origins" }));
      const { counter, logger, socket } = newCounter({ host: "http://h:1/presence/", fetch: checks.fetch });
      assert.equal(socket().url, "ws://h:1/presence/parties/page/%252Fpages%252Fa");
      socket().serverClose(1006); // the 403 looks like this to a browser
      // The backoff's retry is pending while the service is asked.
      assert.deepEqual(clock.delays(), [base * clock.random]);
      assert.equal(checks.calls.length, 1);
      assert.equal(checks.calls[0].url, "http://h:1/presence/api/v1/origin");
      assert.equal(checks.calls[0].init.method, "POST");
      checks.calls[0].settle();
      await flush();
      assert.equal(counter.refused, true);
      assert.equal(counter.state, "waiting");
      assert.equal(logger.lines.error.length, 1);
      const [message] = logger.lines.error;
      assert.ok(message.startsWith("link-counter: "), message);
      assert.match(message, /origin https:\/\/site\.example is not allowed/);
      assert.match(message, /add https:\/\/site\.example to security\.allowed_origins/);
      // The backoff's retry was replaced by a slow one.
      assert.deepEqual(clock.delays(), [refused * (0.5 + clock.random)]);
      // Later failures: slow retries, no more checks, no more messages; "online" does not hurry it.
      for (let i = 0; i < 5; i++) {
        clock.fire();
        assert.equal(FakeSocket.all.length, i + 2);
        socket().serverClose(1006);
        assert.deepEqual(clock.delays(), [refused * (0.5 + clock.random)]);
      }
      counter._onOnline();
      assert.deepEqual(clock.delays(), [refused * (0.5 + clock.random)]);
      assert.equal(checks.calls.length, 1);
      assert.equal(logger.lines.error.length, 1);
      // Once allowed (the operator fixed the setting), it connects and is normal again.
      clock.fire();
      socket().serverOpen();
      assert.equal(counter.refused, false);
      assert.equal(counter.state, "open");
      socket().serverClose(1006); // closed before stableAfter: the attempts go on from 1
      assert.deepEqual(
        clock.delays().filter((d) => d !== DEFAULT_BACKOFF.stableAfter),
        [2 * base * clock.random],
      );
    });
  },

  async "the origin check: asked after the first failure, then every 3 failures in a row"() {
    await withFakeTime(async (clock) => {
      const { counter, checks, logger, socket } = newCounter();
      socket().serverClose(1006);
      assert.equal(checks.calls.length, 1); // never connected: ask at once
      checks.calls[0].settle(); // allowed: an ordinary failure
      await flush();
      const askedAt = [];
      for (let i = 2; i <= 7; i++) {
        clock.fire();
        socket().serverClose(1006);
        if (checks.calls.length > askedAt.length + 1) {
          askedAt.push(i);
          checks.calls.at(-1).settle();
          await flush();
        }
      }
      assert.deepEqual(askedAt, [3, 6]);
      assert.equal(counter.refused, false);
      assert.deepEqual(logger.lines.error, []);
      // Connected once: a later run of failures asks only at the 3rd.
      clock.fire();
      socket().serverOpen();
      socket().serverClose(1006); // it had opened: not a failed attempt
      assert.equal(checks.calls.length, 3);
      for (let i = 1; i <= 3; i++) {
        clock.fire();
        socket().serverClose(1006);
      }
      assert.equal(checks.calls.length, 4);
    });
  },

  async "an unreachable or older service, or no answer yet, leaves the backoff as it is"() {
    for (const answer of [new Error("network down"), 404, { allowed: true, origin: "https://site.example" }]) {
      await withFakeTime(async (clock) => {
        const checks = fakeFetch(() => answer);
        const { counter, logger, socket } = newCounter({ fetch: checks.fetch });
        socket().serverClose(1006);
        assert.equal(checks.calls.length, 1);
        // No second check while one is in flight.
        clock.fire();
        socket().serverClose(1006);
        clock.fire();
        socket().serverClose(1006);
        assert.equal(checks.calls.length, 1, String(answer));
        checks.calls[0].settle();
        await flush();
        assert.equal(counter.refused, false, String(answer));
        assert.deepEqual(logger.lines.error, [], String(answer));
        assert.deepEqual(clock.delays(), [4 * DEFAULT_BACKOFF.base * clock.random], String(answer));
      });
    }
  },

  async "a refusal that arrives after close() or after a connection opened changes nothing"() {
    await withFakeTime(async (clock) => {
      const checks = fakeFetch(() => ({ origin: "https://site.example", allowed: false }));
      const { counter, logger, socket } = newCounter({ fetch: checks.fetch });
      socket().serverClose(1006);
      clock.fire();
      socket().serverOpen();
      checks.calls[0].settle();
      await flush();
      assert.equal(counter.refused, false);
      assert.equal(counter.state, "open");
      assert.deepEqual(logger.lines.error, []);
    });
    await withFakeTime(async (clock) => {
      const checks = fakeFetch(() => ({ origin: "https://site.example", allowed: false }));
      const { counter, logger, socket } = newCounter({ fetch: checks.fetch });
      socket().serverClose(1006);
      counter.close();
      checks.calls[0].settle();
      await flush();
      assert.equal(counter.state, "stopped");
      assert.deepEqual(clock.delays(), []);
      assert.deepEqual(logger.lines.error, []);
    });
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

  "visitor ids: random, one per page load, in memory"() {
    const id = newVisitorId();
    assert.match(id, /^[A-Za-z0-9_-]{22}$/);
    assert.notEqual(newVisitorId(), id);
    const loadId = pageLoadVisitorId();
    assert.match(loadId, /^[A-Za-z0-9_-]{22}$/);
    assert.equal(pageLoadVisitorId(), loadId);
  },

  async "tab group: a newcomer adopts the settled id at once; two tabs that start together settle on the lowest candidate"() {
    await withFakeTime(async (clock) => {
      const bus = fakeBus();
      const opts = { BroadcastChannel: bus.Channel };
      // Two tabs at the same moment: each hears the other's candidate.
      const a = new TabGroup(opts);
      const b = new TabGroup(opts);
      bus.deliver();
      assert.equal(a.id, null);
      clock.fire(200);
      clock.fire(200);
      bus.deliver();
      const lowest = [a._candidate, b._candidate].sort()[0];
      assert.equal(a.id, lowest);
      assert.equal(b.id, lowest);
      assert.equal(await a.ready, lowest);
      // A third tab asks and adopts the settled id without waiting.
      const c = new TabGroup(opts);
      bus.deliver();
      assert.equal(c.id, lowest);
      assert.equal(await c.ready, lowest);
      assert.equal(TAB_CHANNEL, "link-counter");
      for (const t of [a, b, c]) t.close();
    });
  },

  async "tab group: settled ids that crossed converge on the lower one; the loser is told; no channel, own id"() {
    await withFakeTime(async (clock) => {
      const bus = fakeBus();
      const changes = [];
      const mk = (name) => new TabGroup({ BroadcastChannel: bus.Channel, onChange: (id) => changes.push([name, id]) });
      // Neither hears the other before settling (their messages are lost).
      const a = mk("a");
      const b = mk("b");
      bus.queue.length = 0;
      clock.fire(200);
      clock.fire(200);
      assert.equal(a.id, a._candidate);
      assert.equal(b.id, b._candidate);
      bus.deliver(); // their "id" announcements meet
      const lowest = [a._candidate, b._candidate].sort()[0];
      assert.equal(a.id, lowest);
      assert.equal(b.id, lowest);
      const loser = a._candidate === lowest ? "b" : "a";
      assert.deepEqual(changes, [[loser, lowest]]);
      // Garbage on the channel is ignored.
      const other = new bus.Channel(TAB_CHANNEL);
      for (const junk of [null, "x", { type: "id", id: "short" }, { type: "id", id: 5 }, { type: "id" }]) other.postMessage(junk);
      bus.deliver();
      assert.equal(a.id, lowest);
      other.close();
      // In the back/forward cache a tab leaves the channel; back, it announces its id.
      const c = mk("c");
      bus.deliver();
      assert.equal(c.id, lowest);
      a.suspend();
      const d = mk("d");
      bus.deliver();
      assert.equal(d.id, lowest, "b still answers");
      for (const t of [b, c, d]) t.close();
      const e = mk("e"); // asks: nobody is there but the suspended a
      bus.deliver();
      clock.fire(200);
      bus.deliver();
      assert.equal(e.id, e._candidate);
      a.resume();
      bus.deliver();
      const settled = [lowest, e._candidate].sort()[0];
      assert.equal(a.id, settled);
      assert.equal(e.id, settled);
      a.close();
      e.close();
      // No BroadcastChannel: a group of one, settled at once.
      const alone = new TabGroup({ BroadcastChannel: null });
      assert.match(alone.id, /^[A-Za-z0-9_-]{22}$/);
      assert.equal(await alone.ready, alone.id);
    });
  },

  async "setPage moves the connection at once; pause closes normally and stays closed; resume reopens; setVisitor reconnects"() {
    await withFakeTime((clock) => {
      const { counter, socket, updates } = newCounter({ count: "visitors", visitor: "visitor_0123-abcd" });
      socket().serverOpen();
      socket().serverSend({ type: "update", connections: { b: 1, c: 2 }, visitors: { b: 1, c: 2 } });
      const first = socket();
      counter.setPage("%2Fpages%2Fz");
      assert.equal(first.closedWith, 1000);
      assert.equal(counter.state, "connecting");
      assert.equal(socket().url, "ws://h:1/parties/page/%252Fpages%252Fz?visitor=visitor_0123-abcd");
      assert.equal(counter.get("b"), null, "counts are unknown until the new connection's update");
      first.serverClose(1000); // late close of the old socket: ignored
      assert.deepEqual(clock.delays(), []);
      socket().serverOpen();
      assert.deepEqual(socket().sent, [{ type: "subscribe", links: ["b", "c"], visitors: true }]);
      assert.throws(() => counter.setPage("a/b"), /page id "a\/b" contains "\/"/);

      counter.pause();
      assert.equal(socket().closedWith, 1000);
      assert.equal(counter.state, "paused");
      assert.deepEqual(clock.delays(), [], "no retry while paused");
      const sockets = FakeSocket.all.length;
      counter.setVisitor("visitor_other-id"); // remembered, no connection
      assert.equal(FakeSocket.all.length, sockets);
      counter.resume();
      assert.equal(socket().url, "ws://h:1/parties/page/%252Fpages%252Fz?visitor=visitor_other-id");
      socket().serverOpen();
      counter.setVisitor("visitor_third-id");
      assert.equal(FakeSocket.all.at(-2).closedWith, 1000);
      assert.match(socket().url, /visitor=visitor_third-id$/);
      // Every update said unknown counts while not connected.
      assert.ok(updates.every((u) => u.connected || Object.values(u.counts).every((n) => n === null)));
      counter.close();
    });
  },

  "data-away-after durations, and automation detection"() {
    assert.equal(parseAwayAfter("90s"), 90_000);
    assert.equal(parseAwayAfter("2m"), 120_000);
    assert.equal(parseAwayAfter("1500ms"), 1500);
    assert.equal(parseAwayAfter("45"), 45_000);
    assert.equal(parseAwayAfter("off"), null);
    assert.equal(parseAwayAfter("soon"), undefined);
    assert.equal(parseAwayAfter("-1s"), undefined);
    const chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
    assert.equal(isAutomated({ userAgent: chrome, webdriver: false }), false);
    assert.equal(isAutomated({ userAgent: chrome, webdriver: true }), true);
    assert.equal(isAutomated({ userAgent: "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)" }), true);
    assert.equal(isAutomated({ userAgent: chrome.replace("Chrome", "HeadlessChrome") }), true);
    assert.equal(isAutomated({ userAgent: "Mozilla/5.0 (Linux; Android 10; CUBOT X30) Chrome/120.0 Mobile" }), false);
  },

  "the embed knows every crawler the service refuses by default (config/default.toml)"() {
    const toml = readFileSync(new URL("../../config/default.toml", import.meta.url), "utf8");
    const list = toml.match(/^bot_user_agents = \[([^\]]*)\]/m);
    assert.ok(list, "bot_user_agents in config/default.toml");
    const tokens = [...list[1].matchAll(/"([^"]+)"/g)].map((m) => m[1]);
    assert.ok(tokens.length > 10, `tokens: ${tokens}`);
    for (const token of tokens) {
      assert.equal(isAutomated({ userAgent: `Mozilla/5.0 (compatible; ${token}/1.0)` }), true, token);
    }
  },

  async "counting people: the visitor id in the URL, visitors asked for and shown, both figures kept"() {
    await withFakeTime(() => {
      const { counter, updates, socket } = newCounter({ count: "visitors", visitor: "visitor_0123-abcd" });
      assert.equal(socket().url, "ws://h:1/parties/page/%252Fpages%252Fa?visitor=visitor_0123-abcd");
      assert.equal(counter.visitor, "visitor_0123-abcd");
      socket().serverOpen();
      assert.deepEqual(socket().sent, [{ type: "subscribe", links: ["b", "c"], visitors: true }]);
      socket().serverSend({ type: "update", connections: { b: 4, c: 0 }, visitors: { b: 1, c: 0 } });
      assert.deepEqual(Object.fromEntries(counter.counts), { b: 1, c: 0 });
      assert.deepEqual(counter.tally("b"), { connections: 4, visitors: 1 });
      // A new tab of the same person: connections change, the count shown does not.
      socket().serverSend({ type: "update", connections: { b: 5 }, visitors: { b: 1 } });
      assert.deepEqual(counter.tally("b"), { connections: 5, visitors: 1 });
      assert.deepEqual(updates.at(-1).counts, { b: 1, c: 0 });
      socket().serverSend({ type: "update", connections: { c: 2 }, visitors: { c: 2 } });
      assert.deepEqual(updates.at(-1), { counts: { b: 1, c: 2 }, connected: true, changed: ["c"] });
      // A service that does not count visitors: its connections are shown.
      socket().serverSend({ type: "update", connections: { c: 3 } });
      assert.equal(counter.get("c"), 3);
      assert.deepEqual(counter.tally("c"), { connections: 3, visitors: null });
      socket().serverClose(1006);
      assert.equal(counter.tally("b"), null);
    });
  },

  async "by default a counter counts people as this page load's visitor; visitor null sends none"() {
    await withFakeTime(() => {
      {
        FakeSocket.all = [];
        const counter = new LinkCounter({ host: "http://h:1", page: "p", WebSocket: FakeSocket, logger: quietLogger() });
        assert.equal(counter.figure, "visitors");
        assert.equal(FakeSocket.all.at(-1).url, `ws://h:1/parties/page/p?visitor=${pageLoadVisitorId()}`);
        counter.close();
        const anonymous = new LinkCounter({ host: "http://h:1", page: "p", visitor: null, WebSocket: FakeSocket, logger: quietLogger() });
        assert.equal(FakeSocket.all.at(-1).url, "ws://h:1/parties/page/p");
        anonymous.close();
        assert.throws(
          () => new LinkCounter({ host: "http://h:1", page: "p", visitor: "short", WebSocket: FakeSocket }),
          /link-counter: visitor id "short"/,
        );
        assert.throws(
          () => new LinkCounter({ host: "http://h:1", page: "p", count: "tabs", WebSocket: FakeSocket }),
          /link-counter: count "tabs"/,
        );
      }
    });
  },

  "event-stream URLs carry the links, each encoded, the visitors and site flags and the visitor id"() {
    assert.equal(
      eventsUrl("https://x.test/presence", "%2Fa", ["b", "c,d"], { visitors: true, visitor: "abcdefgh1" }),
      "https://x.test/presence/parties/page/%252Fa/events?links=b,c%2Cd&visitors=true&visitor=abcdefgh1",
    );
    assert.equal(eventsUrl("http://h:1", "p", []), "http://h:1/parties/page/p/events?links=");
    assert.equal(eventsUrl("http://h:1", "p", ["a"], { site: true }), "http://h:1/parties/page/p/events?links=a&site=true");
  },

  async "WebSockets failing before they open: the event stream takes over, follows link changes, and a WebSocket that opens later takes over again"() {
    await withFakeTime(async (clock) => {
      FakeEventSource.all = [];
      const { counter, updates, socket } = newCounter({ EventSource: FakeEventSource });
      // FALLBACK_AFTER attempts close before they open (a proxy refusing upgrades).
      for (let i = 0; i < FALLBACK_AFTER; i++) {
        assert.equal(counter.transport, "websocket");
        socket().serverClose(1006);
        clock.fire();
        await flush();
      }
      assert.equal(counter.transport, "sse");
      const es = FakeEventSource.all.at(-1);
      assert.equal(es.url, "http://h:1/parties/page/%252Fpages%252Fa/events?links=b,c");
      es.serverOpen();
      assert.equal(counter.state, "open");
      es.serverSend({ type: "update", connections: { b: 2, c: 0 } });
      assert.deepEqual(updates.at(-1).counts, { b: 2, c: 0 });

      // New links: a second stream opens; the first closes once it is open,
      // and the counts of the links that stay are shown all along.
      counter.setLinks(["b", "d"]);
      const next = FakeEventSource.all.at(-1);
      assert.notEqual(next, es);
      assert.equal(next.url, "http://h:1/parties/page/%252Fpages%252Fa/events?links=b,d");
      assert.equal(es.closed, false);
      assert.equal(counter.get("b"), 2);
      next.serverOpen();
      assert.equal(es.closed, true);
      next.serverSend({ type: "update", connections: { b: 3, d: 1 } });
      assert.deepEqual(Object.fromEntries(counter.counts), { b: 3, d: 1 });

      // Now and then a WebSocket is tried beside the stream: one that fails
      // leaves the stream as it is; one that opens takes over.
      const sockets = FakeSocket.all.length;
      assert.ok(fireLongest(clock) >= DEFAULT_BACKOFF.websocket / 2);
      assert.equal(FakeSocket.all.length, sockets + 1);
      socket().serverClose(1006);
      assert.equal(counter.transport, "sse");
      assert.equal(next.closed, false);
      fireLongest(clock);
      const ws = socket();
      assert.equal(next.closed, false);
      ws.serverOpen();
      assert.equal(counter.transport, "websocket");
      assert.equal(next.closed, true);
      assert.deepEqual(ws.sent, [{ type: "subscribe", links: ["b", "d"] }]);
      assert.equal(counter.get("b"), 3, "the counts stay shown while the WebSocket takes over");
      counter.close();
    });
  },

  async "without an EventSource, or once a WebSocket has opened, two failures are only a reconnect"() {
    await withFakeTime(async (clock) => {
      const { counter, socket } = newCounter();
      for (let i = 0; i < FALLBACK_AFTER + 1; i++) {
        socket().serverClose(1006);
        clock.fire();
        await flush();
      }
      assert.equal(counter.transport, "websocket");
      counter.close();

      FakeEventSource.all = [];
      const second = newCounter({ EventSource: FakeEventSource });
      second.socket().serverOpen();
      second.socket().serverClose(1001);
      for (let i = 0; i < FALLBACK_AFTER; i++) {
        second.counter._retryTimer && clock.fire();
        await flush();
        second.socket().serverClose(1006);
      }
      assert.equal(second.counter.transport, "websocket");
      assert.equal(FakeEventSource.all.length, 0);
      second.counter.close();
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
