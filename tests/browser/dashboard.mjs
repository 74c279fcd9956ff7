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
// them decoded, as text. Last, a second tab opened once the server has
// recorded a few 5-second samples: its chart has them on its very first draw.
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
    const errors = consoleLines.filter((l) => l.startsWith("error") || l.startsWith("pageerror"));
    if (errors.length) throw new Error(`browser console errors:\n${errors.join("\n")}`);
    console.log(`ok   dashboard shows the total, the rate, the top list (ids decoded) and the chart, full on first load (${Date.now() - started} ms)`);
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
