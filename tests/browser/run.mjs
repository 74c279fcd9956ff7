// Real-browser tests of web/link-counter.js, the drop-in embed and the demo
// site, against the real link-counter binary. Driven by tests/browser.rs
// (`cargo test --test browser`); can also be run directly:
//
//   LINK_COUNTER_BIN=target/debug/link-counter node tests/browser/run.mjs
//
// Environment:
//   LINK_COUNTER_BIN                the binary to test (required)
//   LINK_COUNTER_ARTIFACTS          where failure screenshots go (default: a temp dir)
//   LINK_COUNTER_DEMO_SCREENSHOT    if set, also writes a screenshot of the demo there
//   CHROMIUM                        the browser (default /usr/bin/chromium; never downloaded)
//
// The harness starts the binary itself (port 0, temp storage) so that it can
// stop it with SIGTERM and start it again on the same port. No assertion is
// about timing: every wait has a generous deadline and only checks an outcome.

import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

import PartySocket from "partysocket";
import { chromium } from "playwright-core";
import WebSocket from "ws";

import { CHROMIUM, LAUNCH_ARGS, PATIENCE, assertEq, eventually, fail, sleep, startPrefixProxy, viewer } from "./common.mjs";
import { runUnitTests } from "./unit.mjs";

const BIN = process.env.LINK_COUNTER_BIN;
const ARTIFACTS = process.env.LINK_COUNTER_ARTIFACTS || fs.mkdtempSync(path.join(os.tmpdir(), "lc-browser-"));
const DEMO_SCREENSHOT = process.env.LINK_COUNTER_DEMO_SCREENSHOT;

/** Page ids as the embed derives them (documented in README.md, "Add live counts to your site"). */
const ID = {
  a: "%2Fpages%2Fa",
  b: "%2Fpages%2Fb",
  c: "%2Fpages%2Fc",
  d: "%2Fpages%2Fd",
};


// ---------------------------------------------------------------------------
// The service under test

class Service {
  /** `env`: extra environment of the binary (e.g. a setting under test). */
  constructor(bin, env = {}) {
    this.bin = bin;
    this.env = env;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), "lc-browser-data-"));
    this.addr = null;
    this.proc = null;
    this.log = [];
  }

  /** Starts the binary on `bind` and resolves with the address it reports. */
  async start(bind = "127.0.0.1:0") {
    // The port may still be held for a moment after a restart: retry.
    for (let attempt = 0; ; attempt++) {
      try {
        this.addr = await this._startOnce(bind);
        return this.addr;
      } catch (e) {
        if (attempt >= 50) throw e;
        await sleep(200);
      }
    }
  }

  _startOnce(bind) {
    return new Promise((resolve, reject) => {
      const proc = spawn(this.bin, [], {
        env: {
          ...process.env,
          RUST_LOG: process.env.RUST_LOG || "warn",
          LINK_COUNTER__SERVER__BIND: bind,
          LINK_COUNTER__ADMIN__BIND: "127.0.0.1:0",
          LINK_COUNTER__SERVER__SHUTDOWN_TIMEOUT: "3s",
          LINK_COUNTER__STORAGE__PATH: this.dir,
          LINK_COUNTER__WEB__DEMO: "true",
          ...this.env,
        },
        stdio: ["ignore", "pipe", "pipe"],
      });
      proc.stderr.on("data", (d) => this.log.push(d.toString()));
      const lines = readline.createInterface({ input: proc.stdout });
      let done = false;
      lines.once("line", (line) => {
        const m = /^listening on (\S+)$/.exec(line);
        done = true;
        if (m) {
          this.proc = proc;
          resolve(m[1]);
        } else {
          proc.kill("SIGKILL");
          reject(new Error(`unexpected first line: ${line}`));
        }
      });
      proc.once("exit", (code) => {
        if (!done) reject(new Error(`link-counter exited with ${code} before listening: ${this.log.join("")}`));
      });
    });
  }

  /** SIGTERM (graceful: sessions are closed with 1001) and wait for the exit. */
  async stop() {
    const proc = this.proc;
    this.proc = null;
    if (!proc || proc.exitCode !== null) return;
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), PATIENCE);
    const code = await exited;
    clearTimeout(timer);
    if (code !== 0) fail(`link-counter exited with ${code} on SIGTERM`);
  }

  async counts(ids) {
    const q = ids.map((id) => `id=${encodeURIComponent(id)}`).join("&");
    const res = await fetch(`http://${this.addr}/api/v1/counts?${q}`);
    return res.json();
  }

  /** Both figures: {connections: {...}, visitors: {...}}. */
  async tallies(ids) {
    const q = ids.map((id) => `id=${encodeURIComponent(id)}`).join("&");
    const res = await fetch(`http://${this.addr}/api/v1/counts?visitors=true&${q}`);
    return res.json();
  }

  cleanup() {
    this.proc?.kill("SIGKILL");
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}


/**
 * A static "customer site" on another origin that embeds the script. Steps
 * add pages to `server.pages` (path -> HTML) as they need them.
 */
function startSite(addr) {
  const pages = {
    "/site/index.html": `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>A customer site</title></head>
<body>
  <h1>A customer site</h1>
  <p><a id="intro" href="/docs/intro?utm_source=x#top">Intro</a></p>
  <p><a id="cafe" href="/café/">Café</a></p>
  <p><a id="upper" href="/caf%C3%A9/">Café again (encoded)</a></p>
  <p><a id="external" href="https://example.com/elsewhere">Elsewhere</a></p>
  <p><a id="fixed" href="/whatever" data-page-id="pricing">Pricing</a></p>
  <div id="more"></div>
  <script type="module" src="http://${addr}/link-counter.js" data-count-automation data-page="site-home"></script>
</body></html>`,
  };
  pages["/site/marked.html"] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Marked links only</title></head>
<body>
  <nav><a id="nav" href="/">Home</a></nav>
  <p><a id="marked" href="/blog/post-1" data-link-counter>Post 1</a></p>
  <p><a id="plain" href="/blog/post-2">Post 2</a></p>
  <script type="module" src="http://${addr}/link-counter.js" data-count-automation></script>
</body></html>`;
  return new Promise((resolve) => {
    const server = http.createServer((req, res) => {
      const body = pages[req.url];
      res.writeHead(body ? 200 : 404, { "content-type": "text/html; charset=utf-8" });
      res.end(body ?? "not found");
    });
    server.pages = pages;
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

// ---------------------------------------------------------------------------
// Browser helpers

/** The badge next to the link to page `id`: {state, count, label} or null. */
function badgeOf(page, id) {
  return page.evaluate((id) => {
    const b = [...document.querySelectorAll(".link-counter-badge")].find((e) => e.dataset.pageId === id);
    if (!b) return null;
    return {
      state: b.dataset.state,
      count: b.dataset.count === undefined ? null : Number(b.dataset.count),
      text: b.querySelector("[aria-hidden]")?.textContent ?? null,
      label: b.querySelector(".link-counter-sr")?.textContent ?? null,
    };
  }, id);
}

/** A WebSocket URL without its query (the visitor id). */
const withoutQuery = (url) => url.split("?")[0];

/** The `visitor` parameter of a WebSocket URL. */
const visitorParam = (url) => new URL(url).searchParams.get("visitor");

/** The visitor id the embed on `page` sends (the one its tab group settled on). */
const visitorOf = (page) => page.evaluate(() => window.linkCounter.counter.visitor);

/** Both figures of link `id` as the embed on `page` last heard them. */
const tallyOf = (page, id) => page.evaluate((id) => window.linkCounter.counter.tally(id), id);

/** Waits until the badge for `id` on `page` shows `expected` (a number, or "unknown"). */
async function waitBadge(page, id, expected) {
  await eventually(`badge ${decodeURIComponent(id)} on ${page.url()} to show ${expected}`, async () => {
    const b = await badgeOf(page, id);
    if (expected === "unknown" ? b?.state === "unknown" && b.count === null : b?.state === "live" && b.count === expected) {
      return true;
    }
    return b;
  });
}

async function badgeRect(page, id) {
  return page.evaluate((id) => {
    const b = [...document.querySelectorAll(".link-counter-badge")].find((e) => e.dataset.pageId === id);
    const r = b.getBoundingClientRect();
    return { x: r.x, y: r.y, width: r.width, height: r.height };
  }, id);
}

// ---------------------------------------------------------------------------
// The tests

const steps = [];
function step(name, fn) {
  steps.push({ name, fn });
}

/** Every open page, for screenshots on failure. */
const openPages = new Set();
const consoleLines = [];

async function openTab(context, url) {
  const page = await context.newPage();
  openPages.add(page);
  page.on("close", () => openPages.delete(page));
  page.consoleErrors = [];
  page.on("console", (m) => {
    consoleLines.push(`[${page.url()}] ${m.type()}: ${m.text()}`);
    if (m.type() === "error") page.consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleLines.push(`[${page.url()}] pageerror: ${e.message}`));
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  page.sockets = sockets;
  await page.goto(url);
  return page;
}

/** The "link-counter:" lines a page wrote with console.error. */
function embedErrors(page) {
  return page.consoleErrors.filter((t) => t.startsWith("link-counter:"));
}

function defineSteps(svc, browser, site) {
  const siteAddr = `127.0.0.1:${site.address().port}`;
  const base = () => `http://${svc.addr}`;

  step("demo: / redirects to /pages/a; badges count viewers; ids are derived from paths", async () => {
    const context = await browser.newContext();
    const root = await openTab(context, `${base()}/`);
    assertEq(new URL(root.url()).pathname, "/pages/a", "/ redirects to");
    await root.close();

    const b = await openTab(context, `${base()}/pages/b`);
    const c1 = await openTab(context, `${base()}/pages/c`);
    await waitBadge(b, ID.c, 1);
    await waitBadge(b, ID.b, 1); // b links to itself: its own viewer
    await waitBadge(b, ID.a, 0);
    assertEq(b.sockets.map(withoutQuery), [`ws://${svc.addr}/parties/page/${encodeURIComponent(ID.b)}`], "page b's WebSocket URL");
    const label = (await badgeOf(b, ID.c)).label;
    if (!/1 person viewing now/.test(label)) fail(`accessible label: ${label}`);
    assertEq(await svc.counts([ID.b, ID.c]), { [ID.b]: 1, [ID.c]: 1 }, "API counts of the derived ids");

    // The demo's placeholders have the badges' final box before any script runs.
    const noJs = await browser.newContext({ javaScriptEnabled: false });
    const bare = await openTab(noJs, `${base()}/pages/b`);
    const boxOf = (page) =>
      page.evaluate(() => {
        const r = document.querySelector('a[href="c"] + .link-counter-badge').getBoundingClientRect();
        return { x: r.x, y: r.y, width: r.width, height: r.height };
      });
    assertEq(await boxOf(bare), await boxOf(b), "badge box without the script vs live (no layout shift)");
    await noJs.close();

    // Another browser (a context of its own) is another person.
    const other = await browser.newContext();
    const c2 = await openTab(other, `${base()}/pages/c`);
    await waitBadge(b, ID.c, 2);
    await waitBadge(c2, ID.b, 1);
    await c1.close();
    await c2.close();
    await waitBadge(b, ID.c, 0);
    await other.close();
    await context.close();
  });

  step("people, not tabs: two tabs of one browser show 1 person, a second browser 2; data-count=\"connections\" shows tabs; without BroadcastChannel each page load is a person", async () => {
    const alice = await browser.newContext();
    const b = await openTab(alice, `${base()}/pages/b`);
    const c1 = await openTab(alice, `${base()}/pages/c`);
    const c2 = await openTab(alice, `${base()}/pages/c`);
    // The server counts both tabs; page b's badge for c says one person.
    await eventually("page b to hear that c has 2 tabs of 1 person", async () => {
      const t = await tallyOf(b, ID.c);
      return (t?.connections === 2 && t?.visitors === 1) || t;
    });
    const one = await badgeOf(b, ID.c);
    assertEq([one.state, one.count, one.text, one.label], ["live", 1, "1", " (1 person viewing now)"], "badge of c: two tabs, one browser");
    assertEq(await b.evaluate((id) => document.querySelector(`.link-counter-badge[data-page-id="${id}"]`).title, ID.c), "1 person viewing now", "badge title");
    assertEq(await svc.tallies([ID.c]), { connections: { [ID.c]: 2 }, visitors: { [ID.c]: 1 } }, "API figures of c");
    // One random id per browser: the tabs agreed on it in memory; every tab's WebSocket carries it.
    await eventually("the three tabs to send one visitor id", async () => {
      const seen = [];
      for (const tab of [b, c1, c2]) seen.push([await visitorOf(tab), tab.sockets.length ? visitorParam(tab.sockets.at(-1)) : null]);
      return seen.every(([v, sent]) => v === seen[0][0] && sent === v) || seen;
    });
    const id = await visitorOf(b);
    if (!/^[A-Za-z0-9_-]{22}$/.test(id ?? "")) fail(`the tabs' visitor id: ${id}`);

    // A second browser is a second person.
    const bob = await browser.newContext();
    const c3 = await openTab(bob, `${base()}/pages/c`);
    await waitBadge(b, ID.c, 2);
    assertEq((await badgeOf(b, ID.c)).label, " (2 people viewing now)", "badge label of c with two people");
    const bobId = await visitorOf(c3);
    if (!bobId || bobId === id) fail(`the second browser's visitor id: ${bobId} (first: ${id})`);

    // data-count="connections": the badge counts tabs (3: two of Alice's, one of Bob's).
    site.pages["/site/tabs.html"] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Tabs</title></head>
<body>
  <p><a id="c" href="/elsewhere" data-page-id="${ID.c}">Page C</a></p>
  <script type="module" src="http://${svc.addr}/link-counter.js" data-count-automation data-page="tabs" data-count="connections"></script>
</body></html>`;
    const tabs = await openTab(alice, `http://${siteAddr}/site/tabs.html`);
    await waitBadge(tabs, ID.c, 3);
    assertEq((await badgeOf(tabs, ID.c)).label, " (3 tabs open now)", "badge label with data-count=connections");
    await c2.close();
    await waitBadge(tabs, ID.c, 2);
    await waitBadge(b, ID.c, 2); // Alice still has a tab of c

    // No BroadcastChannel (an old browser): every page load is a person of its own.
    const noStorage = await browser.newContext();
    await noStorage.addInitScript(() => {
      Object.defineProperty(window, "BroadcastChannel", { configurable: true, value: undefined });
    });
    const n1 = await openTab(noStorage, `${base()}/pages/c`);
    const n2 = await openTab(noStorage, `${base()}/pages/c`);
    await waitBadge(b, ID.c, 4);
    await eventually("both tabs' WebSockets to be seen", () => (n1.sockets.length === 1 && n2.sockets.length === 1) || [n1.sockets, n2.sockets]);
    const [v1, v2] = [n1.sockets.map(visitorParam), n2.sockets.map(visitorParam)];
    if (v1.length !== 1 || v2.length !== 1 || !/^[A-Za-z0-9_-]{22}$/.test(v1[0]) || v1[0] === v2[0]) {
      fail(`visitor ids without BroadcastChannel: ${JSON.stringify([v1, v2])}`);
    }
    assertEq(embedErrors(n1), [], "console errors without BroadcastChannel");

    await noStorage.close();
    await bob.close();
    await c1.close();
    await waitBadge(b, ID.c, 0);
    await alice.close();
  });

  step("restart: badges go unknown while the server is down, then come back without a reload", async () => {
    const context = await browser.newContext();
    const b = await openTab(context, `${base()}/pages/b`);
    const c = await openTab(context, `${base()}/pages/c`);
    await waitBadge(b, ID.c, 1);
    await waitBadge(b, ID.b, 1);
    const liveRect = await badgeRect(b, ID.c);
    await b.evaluate(() => {
      window.__notReloaded = true;
    });
    const port = svc.addr.split(":").pop();

    await svc.stop();
    for (const id of [ID.a, ID.b, ID.c]) await waitBadge(b, id, "unknown");
    const t = await badgeOf(b, ID.c);
    if (/\d/.test(t.text)) fail(`unknown badge shows a number: ${JSON.stringify(t)}`);
    assertEq(await badgeRect(b, ID.c), liveRect, "badge box while unknown (no layout shift)");

    await svc.start(`127.0.0.1:${port}`);
    await waitBadge(b, ID.c, 1);
    await waitBadge(b, ID.b, 1);
    await waitBadge(b, ID.a, 0);
    await waitBadge(c, ID.b, 1);
    assertEq(await b.evaluate(() => window.__notReloaded === true), true, "page b was not reloaded");
    assertEq(await badgeRect(b, ID.c), liveRect, "badge box when live again");
    await context.close();
  });

  step("embed on another site: same-site links only, path rule, overrides, runtime link changes", async () => {
    const context = await browser.newContext();
    const site = await openTab(context, `http://${siteAddr}/site/index.html`);
    const intro = "%2Fdocs%2Fintro";
    const cafe = "%2Fcaf%C3%A9%2F";
    await waitBadge(site, intro, 0);
    await waitBadge(site, cafe, 0);
    await waitBadge(site, "pricing", 0);
    const ids = await site.evaluate(() =>
      [...document.querySelectorAll(".link-counter-badge")].map((b) => [b.previousElementSibling.id, b.dataset.pageId]),
    );
    assertEq(
      ids,
      [
        ["intro", intro],
        ["cafe", cafe],
        ["upper", cafe],
        ["fixed", "pricing"],
      ],
      "links with badges (no external link) and their ids",
    );
    assertEq(await svc.counts(["site-home"]), { "site-home": 1 }, "data-page sets the page's own id");

    const v1 = await viewer(svc.addr, cafe);
    await waitBadge(site, cafe, 1);

    // A link added at runtime is followed on the same connection.
    await site.evaluate(() => {
      document.getElementById("more").innerHTML = '<a id="added" href="/added" data-page-id="added-later">Added</a>';
    });
    await waitBadge(site, "added-later", 0);
    const v2 = await viewer(svc.addr, "added-later");
    await waitBadge(site, "added-later", 1);
    // Editing a link's target follows the new page.
    await site.evaluate(() => {
      document.getElementById("added").dataset.pageId = "renamed";
    });
    await waitBadge(site, "renamed", 0);
    // Removing a link removes its badge.
    await site.evaluate(() => document.getElementById("intro").remove());
    await eventually("the removed link's badge to go", async () => (await badgeOf(site, intro)) === null || "still there");
    assertEq(site.sockets.length, 1, "WebSockets opened by the page (link changes must not reconnect)");
    assertEq(withoutQuery(site.sockets[0]), `ws://${svc.addr}/parties/page/site-home`, "the site's WebSocket URL");
    assertEq(visitorParam(site.sockets[0]), await visitorOf(site), "the site's WebSocket carries the tab's visitor id");
    v1.close();
    v2.close();
    await waitBadge(site, cafe, 0);

    // With links marked data-link-counter, only those get a badge; without
    // data-page, the page's own id is derived from its path.
    const marked = await openTab(context, `http://${siteAddr}/site/marked.html`);
    await waitBadge(marked, "%2Fblog%2Fpost-1", 0);
    const badged = await marked.evaluate(() =>
      [...document.querySelectorAll(".link-counter-badge")].map((b) => b.previousElementSibling.id),
    );
    assertEq(badged, ["marked"], "links with badges when some are marked");
    assertEq(await svc.counts(["%2Fsite%2Fmarked.html"]), { "%2Fsite%2Fmarked.html": 1 }, "derived own id");
    await context.close();
  });

  step("site figure: <span data-link-counter-site> shows the people on any page of the site", async () => {
    site.pages["/site/people.html"] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>People</title></head>
<body>
  <p>People here now: <span id="people" data-link-counter-site></span></p>
  <p><a id="home" href="/elsewhere" data-page-id="site-home">Home</a></p>
  <script type="module" src="http://${svc.addr}/link-counter.js" data-count-automation data-page="people-home"></script>
</body></html>`;
    const people = (tab) => tab.evaluate(() => document.getElementById("people").textContent);
    const truth = async () => (await (await fetch(`${base()}/api/v1/stats`)).json()).visitors;
    const matches = (tab, what) =>
      eventually(what, async () => {
        const [shown, server] = [await people(tab), await truth()];
        return (shown !== "" && Number(shown) === server) || { shown, server };
      });
    const alice = await browser.newContext();
    const a1 = await openTab(alice, `http://${siteAddr}/site/people.html`);
    await matches(a1, "the span to show the site's people");
    const before = Number(await people(a1));
    if (!(before >= 1)) fail(`the site's people with one tab open: ${before}`);
    // A second person on another page: the figure follows.
    const bob = await browser.newContext();
    await openTab(bob, `http://${siteAddr}/site/index.html`);
    await eventually("bob to be counted", async () => Number(await people(a1)) > before || (await people(a1)));
    await matches(a1, "the span to follow the server");
    assertEq(a1.sockets.length, 1, "one WebSocket for the badges and the site figure");
    assertEq(await svc.counts(["people-home"]), { "people-home": 1 }, "the page's own count");
    await bob.close();
    await alice.close();
  });

  step("PartySocket (unmodified, party \"page\") gets the same counts as our client", async () => {
    const room = encodeURIComponent(ID.d); // PartySocket puts the room in the path as given
    const shown = new Map();
    const ps = new PartySocket({ host: svc.addr, party: "page", room, WebSocket });
    ps.addEventListener("open", () => ps.send(JSON.stringify({ type: "subscribe", links: [ID.b, ID.c, ID.d] })));
    ps.addEventListener("message", (e) => {
      const msg = JSON.parse(e.data);
      if (msg.type === "update") for (const [k, v] of Object.entries(msg.connections)) shown.set(k, v);
    });
    try {
      await eventually("PartySocket to open", () => ps.readyState === 1 || ps.readyState);
      const url = new URL(ps.url);
      assertEq(url.pathname, `/parties/page/${encodeURIComponent(ID.d)}`, "PartySocket URL path");
      if (!url.searchParams.get("_pk")) fail(`PartySocket URL has no _pk: ${ps.url}`);

      const context = await browser.newContext();
      const a = await openTab(context, `${base()}/pages/a`); // links to b, c, d
      const same = async (expected) => {
        await eventually(`both clients to show ${JSON.stringify(expected)}`, async () => {
          const ours = {};
          for (const k of Object.keys(expected)) ours[k] = (await badgeOf(a, k))?.count ?? null;
          const theirs = Object.fromEntries(Object.keys(expected).map((k) => [k, shown.get(k) ?? null]));
          const ok = JSON.stringify(ours) === JSON.stringify(expected) && JSON.stringify(theirs) === JSON.stringify(expected);
          return ok || { ours, partysocket: theirs };
        });
      };
      await same({ [ID.b]: 0, [ID.c]: 0, [ID.d]: 1 }); // the PartySocket views d
      const c = await openTab(context, `${base()}/pages/c`);
      await same({ [ID.b]: 0, [ID.c]: 1, [ID.d]: 1 });
      const b = await openTab(context, `${base()}/pages/b`);
      await same({ [ID.b]: 1, [ID.c]: 1, [ID.d]: 1 });
      await c.close();
      await same({ [ID.b]: 1, [ID.c]: 0, [ID.d]: 1 });
      const d = await openTab(context, `${base()}/pages/d`);
      await same({ [ID.b]: 1, [ID.c]: 0, [ID.d]: 2 });
      await b.close();
      await d.close();
      await same({ [ID.b]: 0, [ID.c]: 0, [ID.d]: 1 });

      // PartySocket passes a visitor id with its `query` option: with this
      // browser's id, its connection to c is one more tab of the same person.
      // (Every page above had at most one tab of this browser, so people and
      // connections were the same numbers.)
      const c2 = await openTab(context, `${base()}/pages/c`);
      await same({ [ID.b]: 0, [ID.c]: 1, [ID.d]: 1 });
      const id = await visitorOf(a);
      const ps2 = new PartySocket({ host: svc.addr, party: "page", room: encodeURIComponent(ID.c), query: { visitor: id }, WebSocket });
      try {
        await eventually("the embed to hear that c has 2 connections of 1 person", async () => {
          const t = await tallyOf(a, ID.c);
          return (t?.connections === 2 && t?.visitors === 1 && shown.get(ID.c) === 2) || { t, partysocket: shown.get(ID.c) };
        });
        assertEq((await badgeOf(a, ID.c)).count, 1, "the embed's badge of c (one person)");
        assertEq(visitorParam(ps2.url), id, "PartySocket's visitor parameter");
      } finally {
        ps2.close();
      }
      await c2.close();
      await context.close();
    } finally {
      ps.close();
    }
  });

  step("path prefix: the demo and the embed under /presence/ stay under /presence/ (script path, data-host path)", async () => {
    // Only /presence/ is proxied: anything the embed asks outside it fails.
    const proxy = await startPrefixProxy("/presence/", svc.addr);
    const via = `http://${proxy.addr}/presence`;
    const P = { b: "%2Fpresence%2Fpages%2Fb", c: "%2Fpresence%2Fpages%2Fc", a: "%2Fpresence%2Fpages%2Fa" };
    const context = await browser.newContext();
    try {
      const root = await openTab(context, `${via}/`);
      assertEq(new URL(root.url()).pathname, "/presence/pages/a", "/presence/ redirects to");
      await root.close();
      // The demo page and its script come from /presence/: the WebSocket goes there too.
      const b = await openTab(context, `${via}/pages/b`);
      const c = await openTab(context, `${via}/pages/c`);
      await waitBadge(b, P.c, 1);
      await waitBadge(b, P.b, 1);
      await waitBadge(b, P.a, 0);
      assertEq(b.sockets.map(withoutQuery), [`ws://${proxy.addr}/presence/parties/page/${encodeURIComponent(P.b)}`], "page b's WebSocket URL");
      assertEq(await svc.counts([P.b, P.c]), { [P.b]: 1, [P.c]: 1 }, "counts of the prefixed pages");
      await c.close();
      await waitBadge(b, P.c, 0);

      // data-host with a path: the script from the service's root, the
      // connection through the prefix the attribute names.
      site.pages["/site/hosted.html"] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>data-host with a path</title></head>
<body>
  <p><a id="intro" href="/docs/intro">Intro</a></p>
  <script type="module" src="http://${svc.addr}/link-counter.js" data-count-automation data-host="${via}" data-page="hosted"></script>
</body></html>`;
      const hosted = await openTab(context, `http://${siteAddr}/site/hosted.html`);
      await waitBadge(hosted, "%2Fdocs%2Fintro", 0);
      assertEq(hosted.sockets.map(withoutQuery), [`ws://${proxy.addr}/presence/parties/page/hosted`], "the data-host page's WebSocket URL");
      assertEq(await svc.counts(["hosted"]), { hosted: 1 }, "the data-host page counts as viewed");
      const v = await viewer(svc.addr, "%2Fdocs%2Fintro");
      await waitBadge(hosted, "%2Fdocs%2Fintro", 1);
      v.close();

      const outside = proxy.seen.filter((r) => !r.url.startsWith("/presence/"));
      assertEq(outside, [], "requests the proxy got outside /presence/");
      // (Page a, the redirect's target, may or may not have connected before its tab closed.)
      const room = (id) => `/presence/parties/page/${encodeURIComponent(id)}`;
      // Which upgrades, not their order: tabs b and c settle their shared
      // visitor id before connecting, so either may connect first.
      const upgrades = proxy.seen
        .filter((r) => r.upgrade && withoutQuery(r.url) !== room(P.a))
        .map((r) => withoutQuery(r.url))
        .sort();
      assertEq(upgrades, [room(P.b), room(P.c), "/presence/parties/page/hosted"].sort(), "upgrades through the proxy");
    } finally {
      await context.close();
      proxy.close();
    }
  });

  step("index.html: /docs/index.html is the page /docs/ (its own id and its links); data-keep-index opts out", async () => {
    const docs = "%2Fdocs%2F";
    const guide = "%2Fguide%2F";
    site.pages["/docs/index.html"] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Docs</title></head>
<body>
  <p><a id="dir" href="/docs/">Docs</a></p>
  <p><a id="file" href="/docs/index.html">Docs again</a></p>
  <p><a id="htm" href="/guide/index.htm?x=1">Guide</a></p>
  <p><a id="other" href="/docs/install.html">Install</a></p>
  <script type="module" src="http://${svc.addr}/link-counter.js" data-count-automation></script>
</body></html>`;
    site.pages["/kept/index.html"] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Kept</title></head>
<body>
  <p><a id="dir" href="/kept/">Kept</a></p>
  <p><a id="file" href="/kept/index.html">Kept, the file</a></p>
  <script type="module" src="http://${svc.addr}/link-counter.js" data-count-automation data-keep-index></script>
</body></html>`;
    const context = await browser.newContext();
    const page = await openTab(context, `http://${siteAddr}/docs/index.html`);
    await waitBadge(page, docs, 1); // the page itself, under the directory's id
    await waitBadge(page, guide, 0);
    const ids = await page.evaluate(() =>
      [...document.querySelectorAll(".link-counter-badge")].map((b) => [b.previousElementSibling.id, b.dataset.pageId]),
    );
    assertEq(
      ids,
      [
        ["dir", docs],
        ["file", docs],
        ["htm", guide],
        ["other", "%2Fdocs%2Finstall.html"],
      ],
      "badge ids with the index rule",
    );
    assertEq(page.sockets.map(withoutQuery), [`ws://${svc.addr}/parties/page/${encodeURIComponent(docs)}`], "its WebSocket URL");
    assertEq(await svc.counts([docs, "%2Fdocs%2Findex.html"]), { [docs]: 1, "%2Fdocs%2Findex.html": 0 }, "counts");

    const kept = await openTab(context, `http://${siteAddr}/kept/index.html`);
    await waitBadge(kept, "%2Fkept%2Findex.html", 1);
    await waitBadge(kept, "%2Fkept%2F", 0);
    assertEq(await svc.counts(["%2Fkept%2Findex.html", "%2Fkept%2F"]), { "%2Fkept%2F": 0, "%2Fkept%2Findex.html": 1 }, "kept counts");
    await context.close();
  });

  step("refused origin: one console.error naming the origin and security.allowed_origins, then no more attempts", async () => {
    // A service that allows another origin only, under a prefix (so the
    // origin check must go through the prefix too).
    const strict = new Service(BIN, { LINK_COUNTER__SECURITY__ALLOWED_ORIGINS: "https://allowed.example" });
    let proxy;
    const context = await browser.newContext();
    try {
      await strict.start();
      proxy = await startPrefixProxy("/presence/", strict.addr);
      site.pages["/site/refused.html"] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Not allowed</title></head>
<body>
  <p><a id="intro" href="/docs/intro">Intro</a></p>
  <script type="module" src="http://${proxy.addr}/presence/link-counter.js" data-count-automation></script>
</body></html>`;
      const expected = (origin) =>
        `link-counter: this page's origin ${origin} is not allowed to connect to http://${proxy.addr}/presence: ` +
        `add ${origin} to security.allowed_origins in the service's configuration ` +
        "(LINK_COUNTER__SECURITY__ALLOWED_ORIGINS in its environment). " +
        "Counts stay unknown; retrying about every 5 minutes.";
      // A site on another origin, and the service's own demo page (the same
      // origin as the service: its Origin header is sent all the same).
      const page = await openTab(context, `http://${siteAddr}/site/refused.html`);
      const demo = await openTab(context, `http://${proxy.addr}/presence/pages/b`);
      for (const [tab, origin] of [
        [page, `http://${siteAddr}`],
        [demo, `http://${proxy.addr}`],
      ]) {
        await eventually(`the embed's console.error on ${tab.url()}`, () => embedErrors(tab).length > 0 || tab.consoleErrors);
        assertEq(embedErrors(tab), [expected(origin)], `the embed's console errors on ${tab.url()}`);
        assertEq(await tab.evaluate(() => window.linkCounter.counter.refused), true, "counter.refused");
      }
      await waitBadge(page, "%2Fdocs%2Fintro", "unknown");
      await waitBadge(demo, "%2Fpresence%2Fpages%2Fc", "unknown");
      const attempts = () => ({
        browser: page.sockets.length + demo.sockets.length,
        proxied: proxy.seen.filter((r) => r.upgrade).length,
      });
      const before = attempts();
      if (before.browser < 2 || before.proxied !== before.browser) fail(`upgrade attempts: ${JSON.stringify(before)}`);
      // The backoff would have tried again within 1 + 2 + 4 s; the refused
      // embed waits minutes. (A negative check: it needs a wait.)
      await sleep(8000);
      assertEq(attempts(), before, "upgrade attempts after 8 s");
      assertEq([embedErrors(page).length, embedErrors(demo).length], [1, 1], "link-counter console errors after 8 s");
      const checks = proxy.seen.filter((r) => r.url === "/presence/api/v1/origin").map((r) => r.method);
      assertEq(checks, ["POST", "POST"], "origin checks through the prefix");
      assertEq(proxy.seen.filter((r) => !r.url.startsWith("/presence/")), [], "requests outside /presence/");
    } finally {
      await context.close();
      proxy?.close();
      await strict.stop().catch(() => {});
      strict.cleanup();
    }
  });

  /** A page of the customer site with the embed (`attrs`: extra attributes of its script tag). */
  const sitePage = (path, body, attrs = "data-count-automation") => {
    site.pages[path] = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${path}</title></head>
<body>
${body}
  <script type="module" src="http://${svc.addr}/link-counter.js" ${attrs}></script>
</body></html>`;
    return `http://${siteAddr}${path}`;
  };
  /** Waits until the embed on `page` has started (window.linkCounter is set). */
  const started = (page) =>
    eventually(`the embed on ${page.url()} to start`, () => page.evaluate(() => window.linkCounter !== undefined));
  /** Waits until the API shows `expected` connection counts ({id: n}). */
  const waitCounts = async (what, expected) => {
    const ids = Object.keys(expected);
    await eventually(what, async () => {
      const c = await svc.counts(ids);
      return ids.every((id) => c[id] === expected[id]) || c;
    });
  };
  /** Waits until the API shows `expected` ({id: {connections, visitors}}). */
  const waitTallies = async (what, expected) => {
    const ids = Object.keys(expected);
    await eventually(what, async () => {
      const t = await svc.tallies(ids);
      const seen = Object.fromEntries(ids.map((id) => [id, { connections: t.connections[id], visitors: t.visitors[id] }]));
      return JSON.stringify(seen) === JSON.stringify(expected) || seen;
    });
  };

  step("nothing stored on the device: after several pages of a site and of the demo, no storage, cookie, database or cache; the old visitor-id key is removed", async () => {
    const context = await browser.newContext();
    site.pages["/site/plain.html"] = "<!DOCTYPE html><title>plain</title><p>no embed</p>";
    // What an earlier version of the embed left behind.
    const plain = await openTab(context, `http://${siteAddr}/site/plain.html`);
    await plain.evaluate(() => localStorage.setItem("link-counter-visitor", "old_visitor_id_0123"));
    const first = sitePage("/site/store-1.html", '<p><a href="/site/store-2.html">two</a> <a href="/site/store-3.html">three</a></p>');
    sitePage("/site/store-2.html", '<p><a href="/site/store-1.html">one</a></p>');
    sitePage("/site/store-3.html", '<p><a href="/site/store-1.html">one</a></p>');
    const tab = await openTab(context, first);
    await waitBadge(tab, "%2Fsite%2Fstore-2.html", 0);
    await waitBadge(tab, "%2Fsite%2Fstore-3.html", 0);
    for (const path of ["/site/store-2.html", "/site/store-3.html"]) {
      await tab.goto(`http://${siteAddr}${path}`);
      await waitBadge(tab, "%2Fsite%2Fstore-1.html", 0);
    }
    await tab.evaluate(() => history.pushState(null, "", "/site/store-2.html"));
    const demo = await openTab(context, `${base()}/pages/b`);
    await waitBadge(demo, ID.c, 0);
    await demo.goto(`${base()}/pages/c`);
    await waitBadge(demo, ID.a, 0);
    for (const page of [tab, demo, plain]) {
      const stored = await page.evaluate(async () => ({
        localStorage: Object.keys(localStorage),
        sessionStorage: Object.keys(sessionStorage),
        cookie: document.cookie,
        indexedDB: (await indexedDB.databases()).map((d) => d.name),
        caches: await caches.keys(),
      }));
      assertEq(stored, { localStorage: [], sessionStorage: [], cookie: "", indexedDB: [], caches: [] }, `what ${page.url()} stored`);
    }
    assertEq(await context.cookies(), [], "the context's cookies");
    await context.close();
  });

  step("tabs: two tabs of one browser are 1 person, a second browser 2, two tabs opened at the same moment 1; the figure falls at the last tab", async () => {
    const target = sitePage("/site/tabs-target.html", "<p>target</p>", 'data-count-automation data-page="tabs-target"');
    const [alice, bob, carol] = [await browser.newContext(), await browser.newContext(), await browser.newContext()];
    const a1 = await openTab(alice, target);
    const a2 = await openTab(alice, target);
    await waitTallies("two tabs of one browser", { "tabs-target": { connections: 2, visitors: 1 } });
    await openTab(bob, target);
    await waitTallies("a second browser", { "tabs-target": { connections: 3, visitors: 2 } });
    // Two tabs at the same moment: they settle on one id.
    const [c1, c2] = await Promise.all([openTab(carol, target), openTab(carol, target)]);
    await waitTallies("two tabs opened together", { "tabs-target": { connections: 5, visitors: 3 } });
    assertEq(await visitorOf(c1), await visitorOf(c2), "the visitor id of the two tabs opened together");
    await a1.close();
    await waitTallies("one of Alice's tabs closed", { "tabs-target": { connections: 4, visitors: 3 } });
    await a2.close();
    await waitTallies("Alice's last tab closed", { "tabs-target": { connections: 3, visitors: 2 } });
    // A tab Alice opens now is a new person to the service: the id died with her last tab.
    await c2.close();
    await waitTallies("one of Carol's tabs closed", { "tabs-target": { connections: 2, visitors: 2 } });
    await c1.close();
    await waitTallies("Carol's last tab closed", { "tabs-target": { connections: 1, visitors: 1 } });
    for (const c of [alice, bob, carol]) await c.close();
    await waitTallies("all closed", { "tabs-target": { connections: 0, visitors: 0 } });
  });

  step("away: a tab hidden longer than data-away-after drops out and is back when visible; off stays counted", async () => {
    const away = sitePage("/site/away.html", '<p><a href="/x" data-page-id="away-watch">w</a></p>', 'data-count-automation data-page="away-short" data-away-after="1s"');
    const stays = sitePage("/site/stays.html", "<p>stays</p>", 'data-count-automation data-page="away-off" data-away-after="off"');
    // Headless Chromium never hides a page (minimizing, switching tabs,
    // Page.setWebLifecycleState all leave it "visible"): the page's
    // visibility is emulated, and a real visibilitychange event is fired.
    const context = await browser.newContext();
    await context.addInitScript(() => {
      let state = "visible";
      Object.defineProperty(Document.prototype, "visibilityState", { configurable: true, get: () => state });
      Object.defineProperty(Document.prototype, "hidden", { configurable: true, get: () => state === "hidden" });
      window.__setVisibility = (s) => {
        state = s;
        document.dispatchEvent(new Event("visibilitychange"));
      };
    });
    const short = await openTab(context, away);
    const off = await openTab(await browser.newContext(), stays);
    const both = (s, o) => ({ "away-short": { connections: s, visitors: s }, "away-off": { connections: o, visitors: o } });
    await waitTallies("both tabs counted", both(1, 1));
    await waitBadge(short, "away-watch", 0);
    await short.evaluate(() => window.__setVisibility("hidden"));
    await off.evaluate(() => {
      Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
      document.dispatchEvent(new Event("visibilitychange"));
    });
    await waitTallies("the hidden tab away after 1 s", both(0, 1));
    assertEq(await short.evaluate(() => window.linkCounter.counter.state), "paused", "the away tab's counter");
    assertEq(await off.evaluate(() => window.linkCounter.counter.state), "open", "the data-away-after=off tab's counter");
    await short.evaluate(() => window.__setVisibility("visible"));
    await waitTallies("the tab back when visible", both(1, 1));
    await waitBadge(short, "away-watch", 0);
    await off.context().close();
    await context.close();
    await waitTallies("closed", both(0, 0));
  });

  step("back/forward cache: leaving a page closes its connection and the page is cached; back, it is restored and counted again", async () => {
    const a = sitePage("/site/bf-a.html", '<p><a id="next" href="/site/bf-b.html">B</a></p>', 'data-count-automation data-page="bf-a"');
    sitePage("/site/bf-b.html", "<p>B</p>", 'data-count-automation data-page="bf-b"');
    // Playwright turns the cache off by default; this browser has it.
    const cached = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: LAUNCH_ARGS, ignoreDefaultArgs: ["--disable-back-forward-cache"] });
    try {
      const context = await cached.newContext();
      const page = await openTab(context, a);
      await waitTallies("page a counted", { "bf-a": { connections: 1, visitors: 1 }, "bf-b": { connections: 0, visitors: 0 } });
      await page.evaluate(() => {
        window.__sameDocument = true;
      });
      await page.click("#next");
      await waitTallies("the reader on page b", { "bf-a": { connections: 0, visitors: 0 }, "bf-b": { connections: 1, visitors: 1 } });
      await page.goBack({ waitUntil: "commit" }); // a restore fires no load event
      await waitTallies("the reader back on page a", { "bf-a": { connections: 1, visitors: 1 }, "bf-b": { connections: 0, visitors: 0 } });
      await waitBadge(page, "%2Fsite%2Fbf-b.html", 0);
      const restored = await page.evaluate(() => ({
        sameDocument: window.__sameDocument === true,
        notRestoredReasons: performance.getEntriesByType("navigation")[0]?.notRestoredReasons ?? null,
      }));
      assertEq(restored, { sameDocument: true, notRestoredReasons: null }, "page a restored from the back/forward cache");
      await context.close();
    } finally {
      await cached.close();
    }
  });

  step("automation: without data-count-automation an automated Chromium opens no WebSocket; a crawler User-Agent is refused (403) and counts nothing, the same client without it counts", async () => {
    const context = await browser.newContext();
    const url = sitePage("/site/automated.html", '<p><a href="/docs/intro">Intro</a></p>', 'data-page="automated"');
    const page = await openTab(context, url);
    await started(page);
    assertEq(await page.evaluate(() => navigator.webdriver), true, "navigator.webdriver in the test browser");
    // The embed decided at start: no counter, hence no connection ever.
    assertEq(await page.evaluate(() => [window.linkCounter.automated, window.linkCounter.counter]), [true, null], "the embed in an automated browser");
    assertEq(page.sockets, [], "WebSockets of the automated page");
    assertEq(await page.evaluate(() => document.querySelectorAll(".link-counter-badge").length), 0, "badges");
    assertEq(await svc.counts(["automated"]), { automated: 0 }, "count of the automated page");

    // The page opts in, but the browser says it is Googlebot: the service refuses it.
    const googlebot = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; +http://www.google.com/bot.html) Chrome/131.0.0.0 Safari/537.36";
    const crawlerUrl = sitePage("/site/crawled.html", '<p><a href="/docs/intro">Intro</a></p>', 'data-count-automation data-page="crawled"');
    const crawler = await browser.newContext({ userAgent: googlebot });
    const crawled = await openTab(crawler, crawlerUrl);
    await eventually("the crawler's upgrade to fail", async () => {
      const s = await crawled.evaluate(() => ({ everOpened: window.linkCounter?.counter?._everOpened, failed: window.linkCounter?.counter?._failedOpens }));
      return (crawled.sockets.length >= 1 && s.everOpened === false && s.failed >= 1) || { ...s, sockets: crawled.sockets };
    });
    // What the service answers that upgrade (the browser hides the status).
    const status = await new Promise((resolve, reject) => {
      const [host, port] = svc.addr.split(":");
      const req = http.request({
        host,
        port,
        path: "/parties/page/crawled",
        headers: { "user-agent": googlebot, upgrade: "websocket", connection: "Upgrade", "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==" },
      });
      req.on("response", (res) => {
        res.resume();
        resolve(res.statusCode);
      });
      req.on("upgrade", (res, socket) => {
        socket.destroy();
        resolve(res.statusCode);
      });
      req.on("error", reject);
      req.end();
    });
    assertEq(status, 403, "the service's answer to the crawler's upgrade");
    assertEq(await svc.counts(["crawled"]), { crawled: 0 }, "count of the crawled page");
    // The same browser without the crawler's User-Agent is counted.
    const person = await browser.newContext();
    const read = await openTab(person, crawlerUrl);
    await waitBadge(read, "%2Fdocs%2Fintro", 0);
    assertEq(await svc.counts(["crawled"]), { crawled: 1 }, "count with a browser's User-Agent");
    for (const c of [context, crawler, person]) await c.close();
  });

  step("single-page sites: pushState moves the reader to the new page and the badges follow the new links; popstate back; setPage", async () => {
    const one = "%2Fspa%2Fone";
    const two = "%2Fspa%2Fdeep%2Ftwo";
    const url = sitePage("/spa/one", '<nav id="nav"><a id="rel" href="next">Next</a></nav>');
    const context = await browser.newContext();
    const page = await openTab(context, url);
    await waitBadge(page, "%2Fspa%2Fnext", 0);
    await waitCounts("page one counted", { [one]: 1, [two]: 0 });
    // The router changes the URL, then renders the new page's links.
    await page.evaluate(() => {
      history.pushState({}, "", "/spa/deep/two");
      document.getElementById("nav").insertAdjacentHTML("beforeend", '<a id="added" href="three">Three</a>');
    });
    await waitCounts("the reader to move to page two", { [one]: 0, [two]: 1 });
    await waitBadge(page, "%2Fspa%2Fdeep%2Fnext", 0); // the relative link resolves against the new URL
    await waitBadge(page, "%2Fspa%2Fdeep%2Fthree", 0);
    assertEq(await badgeOf(page, "%2Fspa%2Fnext"), null, "the badge of the old link target");
    const v = await viewer(svc.addr, "%2Fspa%2Fdeep%2Fthree");
    await waitBadge(page, "%2Fspa%2Fdeep%2Fthree", 1);
    v.close();
    await page.goBack(); // popstate: same document, back to page one
    await waitCounts("the reader back on page one", { [one]: 1, [two]: 0 });
    await waitBadge(page, "%2Fspa%2Fnext", 0);
    // An app that manages ids itself.
    await page.evaluate(() => window.linkCounter.setPage("app-view-7"));
    await waitCounts("the reader on app-view-7", { [one]: 0, "app-view-7": 1 });
    assertEq(embedErrors(page), [], "console errors");
    await context.close();
  });

  if (DEMO_SCREENSHOT) {
    step(`screenshot of the demo for the docs (${DEMO_SCREENSHOT})`, async () => {
      const context = await browser.newContext({ viewport: { width: 760, height: 560 }, deviceScaleFactor: 1 });
      const a = await openTab(context, `${base()}/pages/a`);
      // One person on b, three on c (each a browser of its own).
      const others = [];
      for (const p of ["b", "c", "c", "c"]) {
        const person = await browser.newContext();
        others.push(person);
        await openTab(person, `${base()}/pages/${p}`);
      }
      await waitBadge(a, ID.b, 1);
      await waitBadge(a, ID.c, 3);
      await waitBadge(a, ID.d, 0);
      await a.bringToFront();
      await a.screenshot({ path: DEMO_SCREENSHOT });
      for (const person of others) await person.close();
      await context.close();
    });
  }
}

async function screenshotAll(stepName) {
  const files = [];
  let n = 0;
  for (const page of openPages) {
    const file = path.join(ARTIFACTS, `failure-${stepName.replace(/[^a-z0-9]+/gi, "-").slice(0, 40)}-${n++}.png`);
    try {
      await page.screenshot({ path: file, fullPage: true, timeout: 10_000 });
      files.push(`${file} (${page.url()})`);
    } catch (e) {
      files.push(`(no screenshot of ${page.url()}: ${e.message})`);
    }
  }
  return files;
}

async function main() {
  if (!BIN) fail("set LINK_COUNTER_BIN to the link-counter binary");
  if (!fs.existsSync(CHROMIUM)) fail(`${CHROMIUM} is missing: run apt-get install -y chromium`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });

  const started = Date.now();
  await runUnitTests();
  console.log("ok   link-counter.js unit tests (fake WebSocket)");

  const svc = new Service(BIN);
  let browser;
  let site;
  let failed = 0;
  try {
    await svc.start();
    site = await startSite(svc.addr);
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: LAUNCH_ARGS });
    defineSteps(svc, browser, site);
    for (const { name, fn } of steps) {
      const t0 = Date.now();
      try {
        await fn();
        console.log(`ok   ${name} (${Date.now() - t0} ms)`);
      } catch (e) {
        failed++;
        console.log(`FAIL ${name}\n     ${e.stack}`);
        for (const f of await screenshotAll(name)) console.log(`     screenshot: ${f}`);
        console.log(`     browser console:\n${consoleLines.map((l) => `       ${l}`).join("\n")}`);
        console.log(`     server log:\n${svc.log.join("")}`);
        for (const page of [...openPages]) await page.close().catch(() => {});
        if (!svc.proc) await svc.start(`127.0.0.1:${svc.addr.split(":").pop()}`);
      }
    }
  } finally {
    await browser?.close();
    site?.close();
    await svc.stop().catch((e) => console.log(`stop: ${e.message}`));
    svc.cleanup();
  }
  console.log(`${failed ? "FAILED" : "passed"}: ${steps.length - failed}/${steps.length} browser steps in ${Date.now() - started} ms`);
  if (failed) process.exit(1);
}

main().catch((e) => {
  console.error(e.stack);
  process.exit(1);
});
