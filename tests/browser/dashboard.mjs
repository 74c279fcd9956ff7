// Real-browser test of the operator dashboard (/dashboard on the admin
// listener, web/dashboard.html). Driven by tests/browser.rs
// (`cargo test --test browser dashboard`); can also be run directly:
//
//   LINK_COUNTER_BIN=target/debug/link-counter node tests/browser/dashboard.mjs
//
// Environment: LINK_COUNTER_BIN (required), LINK_COUNTER_ARTIFACTS (failure
// screenshot directory), CHROMIUM (default /usr/bin/chromium; never downloaded).
//
// Starts the binary (port 0 for both listeners, an admin.token), opens the
// dashboard in Chromium without the token (it says how to give it), then with
// it in the URL fragment, opens WebSocket viewers to two pages and waits until the page
// shows the total and the top list; then closes one and waits for the drop.
// Then viewers of percent-encoded ids (as the embed makes them): the list shows
// them decoded, as text. Then a second tab opened once the server has
// recorded a few 5-second samples: its chart has them on its very first draw.
// Then the stored history: the site's live figure and 48-hour chart and each
// top page's sparkline are drawn with data (screenshot dashboard.png in the
// artifacts directory, kept); a page's own view opens with its 48 h and 90 d
// charts and stats; full-screen mode fits a 1920x1080 window; a 360 px phone
// viewport has nothing wider than the screen.
// Every wait has a generous deadline and only checks an outcome.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

import { chromium } from "playwright-core";
import { CHROMIUM, LAUNCH_ARGS, eventually, sleep, viewer } from "./common.mjs";

const BIN = process.env.LINK_COUNTER_BIN;
// admin.token for this run: the page must get it from its URL fragment.
const TOKEN = "dashboard-test-token-0123456789";
const ARTIFACTS = process.env.LINK_COUNTER_ARTIFACTS || fs.mkdtempSync(path.join(os.tmpdir(), "lc-dashboard-"));


/** Starts the binary; resolves with {proc, addr, admin, log, started}. */
function startService(dir) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const log = [];
    const proc = spawn(BIN, [], {
      env: {
        ...process.env,
        RUST_LOG: process.env.RUST_LOG || "warn",
        LINK_COUNTER__SERVER__BIND: "127.0.0.1:0",
        LINK_COUNTER__ADMIN__BIND: "127.0.0.1:0",
        LINK_COUNTER__STORAGE__PATH: dir,
        LINK_COUNTER__ADMIN__TOKEN: TOKEN,
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    proc.stderr.on("data", (d) => log.push(d.toString()));
    const lines = readline.createInterface({ input: proc.stdout });
    const found = {};
    lines.on("line", (line) => {
      let m;
      if ((m = /^listening on (\S+)$/.exec(line))) found.addr = m[1];
      if ((m = /^admin listening on (\S+)$/.exec(line))) found.admin = m[1];
      if (found.addr && found.admin) resolve({ proc, log, started, ...found });
    });
    proc.once("exit", (code) => reject(new Error(`link-counter exited with ${code}: ${log.join("")}`)));
  });
}


/** What the dashboard shows: the total and the top rows. */
function shown(page) {
  return page.evaluate(() => ({
    total: document.getElementById("total").dataset.value,
    rate: document.getElementById("rate").textContent,
    top: [...document.querySelectorAll("#top tbody tr")].map((tr) => ({
      id: tr.dataset.pageId,
      shown: tr.cells[1].textContent,
      now: Number(tr.cells[2].textContent),
      peak: Number(tr.cells[3].textContent),
      total: Number(tr.cells[4].textContent),
    })),
    points: document.getElementById("line").getAttribute("points").trim().split(/\s+/).filter(Boolean).length,
  }));
}

/** The overview's figures and charts as drawn. */
function drawn(page) {
  return page.evaluate(() => {
    const site = document.getElementById("site-chart");
    return {
      siteNow: document.getElementById("site-now").dataset.value,
      total: document.getElementById("total").dataset.value,
      sitePoints: Number(site.dataset.points || 0),
      siteMax: Number(site.dataset.max || 0),
      siteLine: (site.querySelector("path.line")?.getAttribute("d") || "").length > 10,
      sparks: [...document.querySelectorAll("#top tbody tr svg.spark")].map((s) => Number(s.dataset.points || 0)),
    };
  });
}

/** Whether the page fits its window (no scrolling) with `selectors` inside it. */
function fits(page, selectors) {
  return page.evaluate((selectors) => {
    const W = innerWidth, H = innerHeight, doc = document.documentElement;
    const outside = selectors.filter((sel) => {
      const e = document.querySelector(sel);
      if (!e) return true;
      const r = e.getBoundingClientRect();
      return r.width === 0 || r.height === 0 || r.left < 0 || r.top < 0 || r.right > W + 0.5 || r.bottom > H + 0.5;
    });
    const chart = document.getElementById("site-chart");
    return {
      tv: document.body.classList.contains("tv"),
      fits: doc.scrollHeight <= H && doc.scrollWidth <= W && outside.length === 0,
      redrawn: chart.getAttribute("viewBox")?.startsWith(`0 0 ${Math.round(chart.clientWidth)} `),
      outside, scroll: [doc.scrollWidth, doc.scrollHeight], window: [W, H],
    };
  }, selectors);
}

/** The chart as drawn: its point count and the time it spans (from the x coordinates). */
function chart(page) {
  return page.evaluate(() => {
    const xs = document.getElementById("line").getAttribute("points").trim().split(/\s+/)
      .filter(Boolean).map((p) => Number(p.split(",")[0]));
    // x = 24 + 576 * (1 - age / 15 min): see drawChart in web/dashboard.html.
    const spanSeconds = xs.length ? ((Math.max(...xs) - Math.min(...xs)) / 576) * 900 : 0;
    return { points: xs.length, spanSeconds, status: document.getElementById("status").textContent };
  });
}

async function main() {
  if (!BIN) throw new Error("LINK_COUNTER_BIN is not set");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "lc-dashboard-data-"));
  const started = Date.now();
  let svc;
  let browser;
  let page;
  const consoleLines = [];
  const sockets = [];
  try {
    svc = await startService(dir);
    browser = await chromium.launch({ executablePath: CHROMIUM, args: LAUNCH_ARGS });
    page = await browser.newPage();
    page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
    // Without the token the page says how to give it.
    await page.goto(`http://${svc.admin}/dashboard`);
    await eventually("the dashboard to ask for admin.token", async () => {
      const status = await page.evaluate(() => document.getElementById("status").textContent);
      return status.includes("/dashboard#token=") || status;
    });
    consoleLines.length = 0; // the browser logs the 401s themselves

    // With it (in the fragment, which never reaches the server), it works,
    // and the token leaves the address bar.
    await page.goto("about:blank");
    await page.goto(`http://${svc.admin}/dashboard#token=${TOKEN}`);
    await eventually("the token to leave the address bar", async () => !page.url().includes("token") || page.url());

    await eventually("the dashboard to show 0 connections", async () => {
      const s = await shown(page);
      return (s.total === "0" && s.top.length === 0) || s;
    });

    // Two viewers of one page, one of another.
    sockets.push(await viewer(svc.addr, "alpha"), await viewer(svc.addr, "alpha"), await viewer(svc.addr, "beta"));
    await eventually("the total and the top list to update", async () => {
      const s = await shown(page);
      const ok =
        s.total === "3" &&
        s.top.length === 2 &&
        s.top[0].id === "alpha" && s.top[0].now === 2 && s.top[0].peak === 2 && s.top[0].total === 2 &&
        s.top[1].id === "beta" && s.top[1].now === 1;
      return ok || s;
    });

    // One leaves: the total drops, alpha keeps its peak.
    sockets.shift().close();
    await eventually("the total to drop to 2", async () => {
      const s = await shown(page);
      const alpha = s.top.find((r) => r.id === "alpha");
      return (s.total === "2" && alpha?.now === 1 && alpha?.peak === 2 && s.points >= 3) || s;
    });
    const s = await shown(page);
    if (!/^\d+(\.\d+)?$/.test(s.rate)) throw new Error(`connections per second not shown: ${s.rate}`);

    // Ids as the embed makes them (percent-encoded paths) are shown decoded,
    // as text: markup in an id stays text; an id that does not decode is shown as is.
    const encoded = "%2Fpages%2F%C3%A9t%C3%A9";
    const markup = "%3Cimg%20src%3Dx%20onerror%3D%22window.pwned%3D1%22%3E";
    sockets.push(await viewer(svc.addr, encoded), await viewer(svc.addr, markup), await viewer(svc.addr, "100%"));
    await eventually("the ids to be shown decoded", async () => {
      const s = await shown(page);
      const by = (id) => s.top.find((r) => r.id === id)?.shown;
      const ok =
        by(encoded) === "/pages/été" &&
        by(markup) === '<img src=x onerror="window.pwned=1">' &&
        by("100%") === "100%" &&
        by("alpha") === "alpha";
      return ok || s;
    });
    const injected = await page.evaluate(() => document.querySelectorAll("#top img").length + (window.pwned ? 1 : 0));
    if (injected) throw new Error("an id was rendered as HTML");

    // A tab opened now: the server has recorded a sample every 5 s since it
    // started, so the chart has them on its first draw (without the server's
    // history it would have one point, this poll's).
    const uptime = Date.now() - svc.started;
    if (uptime < 13_000) await sleep(13_000 - uptime);
    const second = await browser.newPage();
    second.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    second.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
    await second.goto(`http://${svc.admin}/dashboard#token=${TOKEN}`);
    await eventually("the second tab's first update", async () => {
      const c = await chart(second);
      return c.status.startsWith("updated") || c;
    });
    const first = await chart(second);
    if (!(first.points >= 3 && first.spanSeconds >= 9)) {
      throw new Error(`the chart is not filled from the server's history on load: ${JSON.stringify(first)}`);
    }
    await second.close();

    // The site's live figure and its 48-hour chart (the minute in progress
    // at least), each top page's sparkline: drawn with data.
    await eventually("the site figure, its chart and the sparklines", async () => {
      const d = await drawn(page);
      const ok = d.siteNow === d.total && Number(d.total) >= 5 &&
        d.sitePoints >= 1 && d.siteMax >= 5 && d.siteLine &&
        d.sparks.length >= 5 && d.sparks.every((n) => n >= 1);
      return ok || d;
    });
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await page.setViewportSize({ width: 1280, height: 900 });
    await sleep(300); // one redraw at the new width (the next poll)
    await page.screenshot({ path: path.join(ARTIFACTS, "dashboard.png"), fullPage: true });

    // A page's own view: its live figures, 48-hour and 90-day charts, stats.
    await page.click('#top tbody tr[data-page-id="alpha"] td.id a');
    await eventually("alpha's page view", async () => {
      const v = await page.evaluate(() => ({
        shown: !document.getElementById("page-view").hidden && document.getElementById("overview").hidden,
        title: document.getElementById("pv-title").textContent,
        now: document.getElementById("pv-now").dataset.value,
        h48: Number(document.getElementById("pv-48h").dataset.points || 0),
        d90: Number(document.getElementById("pv-90d").dataset.points || 0),
        max48: Number(document.getElementById("pv-48h").dataset.max || 0),
        stats: document.querySelectorAll("#pv-stats dt").length,
        url: location.hash,
      }));
      const ok = v.shown && v.title === "alpha" && v.now === "1" && v.h48 >= 1 && v.d90 >= 1 &&
        v.max48 >= 2 && v.stats >= 5 && v.url === "#page=alpha";
      return ok || v;
    });
    await page.screenshot({ path: path.join(ARTIFACTS, "dashboard-page.png"), fullPage: true });
    await page.click("#back");
    await eventually("the overview again", async () =>
      page.evaluate(() => !document.getElementById("overview").hidden && location.hash === ""));

    // Full screen for a spare monitor: everything in a 1920x1080 window,
    // nothing to scroll, the live figure, the chart and the top rows inside.
    await page.setViewportSize({ width: 1920, height: 1080 });
    await page.click("#fullscreen");
    await eventually("the full-screen layout to fit 1920x1080", async () => {
      const f = await fits(page, ["#site-now", "#site-chart", "#top tbody tr:first-child", "#top-box h2"]);
      return (f.tv && f.fits && f.redrawn) || f;
    });
    await page.screenshot({ path: path.join(ARTIFACTS, "dashboard-fullscreen.png") });
    await page.keyboard.press("Escape");
    await eventually("Esc to leave full screen", async () =>
      page.evaluate(() => !document.body.classList.contains("tv")));

    // A phone: nothing wider than the screen, in the overview and a page view.
    const phone = await browser.newPage({ viewport: { width: 360, height: 740 }, isMobile: true, hasTouch: true });
    phone.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    phone.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
    await phone.goto(`http://${svc.admin}/dashboard#token=${TOKEN}`);
    for (const where of ["overview", "page view"]) {
      await eventually(`the phone's ${where} to fit its width`, async () => {
        const w = await phone.evaluate(() => {
          const width = document.documentElement.clientWidth;
          const wider = [...document.querySelectorAll("body *")]
            .filter((e) => e.getClientRects().length && e.getBoundingClientRect().right > width + 0.5)
            .map((e) => e.id || e.tagName);
          return {
            updated: document.getElementById("status").textContent.startsWith("updated"),
            scroll: document.documentElement.scrollWidth, width, wider: wider.slice(0, 5),
            charted: Number(document.getElementById(location.hash ? "pv-48h" : "site-chart").dataset.points || 0),
          };
        });
        return (w.updated && w.scroll <= w.width && w.wider.length === 0 && w.charted >= 1) || w;
      });
      await phone.screenshot({ path: path.join(ARTIFACTS, `dashboard-phone-${where.replace(" ", "-")}.png`), fullPage: true });
      if (where === "overview") await phone.goto(`http://${svc.admin}/dashboard#page=${encodeURIComponent(encoded)}`);
    }
    await phone.close();

    const errors = consoleLines.filter((l) => l.startsWith("error") || l.startsWith("pageerror"));
    if (errors.length) throw new Error(`browser console errors:\n${errors.join("\n")}`);
    console.log(`ok   dashboard shows the total, the rate, the top list (ids decoded) and the chart, full on first load; the site figure, its 48 h chart and the sparklines with data; the page view; full screen fits 1920x1080; a phone has no horizontal scroll (${Date.now() - started} ms)`);
  } catch (e) {
    console.log(`FAIL dashboard\n     ${e.stack}`);
    if (page) {
      fs.mkdirSync(ARTIFACTS, { recursive: true });
      const file = path.join(ARTIFACTS, "dashboard.png");
      await page.screenshot({ path: file, fullPage: true }).catch(() => {});
      console.log(`     screenshot: ${file}`);
    }
    console.log(`     browser console:\n${consoleLines.map((l) => `       ${l}`).join("\n")}`);
    console.log(`     server log:\n${svc?.log.join("") ?? ""}`);
    process.exitCode = 1;
  } finally {
    for (const ws of sockets) ws.terminate();
    await browser?.close();
    if (svc?.proc && svc.proc.exitCode === null) {
      const exited = new Promise((r) => svc.proc.once("exit", r));
      svc.proc.kill("SIGTERM");
      await exited;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e.stack);
  process.exit(1);
});
