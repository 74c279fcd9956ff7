// The embed's event-stream fallback in a real browser, through the shipped
// nginx file (deploy/nginx/link-counter.conf) over TLS, twice: as shipped,
// and with WebSocket upgrades stripped (Upgrade and Connection cleared
// towards the service, as a proxy that blocks WebSockets does). Through the
// first the embed uses a WebSocket; through the second it shows live, exact
// counts over the event stream, and its reader counts like any other.
// Driven by tests/browser.rs (`cargo test --test browser fallback`).
//
// Environment: LINK_COUNTER_BIN (required), LINK_COUNTER_ARTIFACTS, CHROMIUM.
// Needs nginx (/usr/sbin/nginx) and the openssl CLI. No assertion is about
// timing: every wait has a generous deadline and only checks an outcome.

import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

import { chromium } from "playwright-core";

import { CHROMIUM, LAUNCH_ARGS, assertEq, eventually, fail, viewer } from "./common.mjs";

const BIN = process.env.LINK_COUNTER_BIN;
const ARTIFACTS = process.env.LINK_COUNTER_ARTIFACTS || fs.mkdtempSync(path.join(os.tmpdir(), "lc-fallback-"));
const NGINX = "/usr/sbin/nginx";
const SHIPPED = new URL("../../deploy/nginx/link-counter.conf", import.meta.url);
const PLACEHOLDER = "presence.example.com";

/** Page ids as the embed derives them on the demo site. */
const ID = { b: "%2Fpages%2Fb", c: "%2Fpages%2Fc" };

/** A port free on 127.0.0.1 now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** `text` with `from` replaced by `to` everywhere; `from` must occur. */
function swap(text, from, to) {
  if (!text.includes(from)) fail(`${SHIPPED.pathname} no longer contains ${JSON.stringify(from)}`);
  return text.split(from).join(to);
}

/** The binary on `bind` with the demo on, allowing `origins`; resolves with the service. */
function startService(bind, origins) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "lc-fallback-data-"));
  const proc = spawn(BIN, [], {
    env: {
      ...process.env,
      RUST_LOG: process.env.RUST_LOG || "warn",
      LINK_COUNTER__SERVER__BIND: bind,
      LINK_COUNTER__ADMIN__BIND: "",
      LINK_COUNTER__STORAGE__PATH: dir,
      LINK_COUNTER__WEB__DEMO: "true",
      LINK_COUNTER__SECURITY__ALLOWED_ORIGINS: origins.join(","),
      LINK_COUNTER__SECURITY__TRUSTED_PROXIES: "127.0.0.1/32",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: proc.stdout });
    lines.once("line", (line) => {
      const m = /^listening on (\S+)$/.exec(line);
      if (!m) return reject(new Error(`unexpected first line: ${line}`));
      resolve({
        addr: m[1],
        async counts(ids) {
          const res = await fetch(`http://${m[1]}/api/v1/counts?${ids.map((i) => `id=${encodeURIComponent(i)}`).join("&")}`);
          return res.json();
        },
        stop() {
          proc.kill("SIGTERM");
          fs.rmSync(dir, { recursive: true, force: true });
        },
      });
    });
    proc.once("exit", (code) => reject(new Error(`link-counter exited with ${code} before listening`)));
  });
}

/** A self-signed certificate for `hosts`, made with the openssl CLI, in `dir`. */
function makeCertificate(dir, hosts) {
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
    "-keyout", path.join(dir, "key.pem"), "-out", path.join(dir, "cert.pem"),
    "-subj", `/CN=${hosts[0]}`, "-addext", `subjectAltName=${hosts.map((h) => `DNS:${h}`).join(",")}`,
  ], { stdio: "ignore" });
}

/**
 * nginx serving the shipped file for `host` in front of `upstream`, its
 * ports, host name, certificate paths, webroot and upstream substituted (and
 * its IPv6 listens dropped); `edit` may change it further. Resolves with the
 * HTTPS port and a stop function.
 */
async function startNginx(host, upstream, edit = (t) => t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "lc-fallback-nginx-"));
  for (const sub of ["tmp", "www", "logs"]) fs.mkdirSync(path.join(dir, sub));
  makeCertificate(dir, [host]);
  const [http, https] = [await freePort(), await freePort()];
  let site = fs.readFileSync(SHIPPED, "utf8");
  site = site
    .split("\n")
    .filter((l) => !l.includes("listen [::]"))
    .join("\n");
  site = swap(site, "listen 80;", `listen 127.0.0.1:${http};`);
  site = swap(site, "listen 443 ssl;", `listen 127.0.0.1:${https} ssl;`);
  site = swap(site, `/etc/letsencrypt/live/${PLACEHOLDER}/fullchain.pem`, path.join(dir, "cert.pem"));
  site = swap(site, `/etc/letsencrypt/live/${PLACEHOLDER}/privkey.pem`, path.join(dir, "key.pem"));
  site = swap(site, "root /var/www/html;", `root ${path.join(dir, "www")};`);
  site = swap(site, "server 127.0.0.1:1999;", `server ${upstream};`);
  site = swap(site, PLACEHOLDER, host);
  site = edit(site);
  fs.writeFileSync(path.join(dir, "site.conf"), site);
  const temp = (k) => `${k} ${path.join(dir, "tmp", k)};`;
  fs.writeFileSync(
    path.join(dir, "nginx.conf"),
    [
      process.getuid?.() === 0 ? "user root;" : "",
      "worker_processes 1;",
      `pid ${path.join(dir, "nginx.pid")};`,
      `error_log ${path.join(dir, "logs", "error.log")} warn;`,
      "events {}",
      "http {",
      "  include /etc/nginx/mime.types;",
      "  access_log off;",
      ...["client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path"].map(
        (k) => `  ${temp(k)}`,
      ),
      `  include ${path.join(dir, "site.conf")};`,
      "}",
    ].join("\n"),
  );
  const proc = spawn(NGINX, ["-p", dir, "-c", path.join(dir, "nginx.conf"), "-g", "daemon off;"], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  await eventually(`nginx on ${https}`, () =>
    new Promise((resolve) => {
      const s = net.connect(https, "127.0.0.1", () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve("not listening yet"));
    }),
  );
  return {
    https,
    stop() {
      proc.kill("SIGTERM");
    },
  };
}

/** The badge next to the link to page `id`: {state, count} or null. */
function badgeOf(page, id) {
  return page.evaluate((id) => {
    const b = [...document.querySelectorAll(".link-counter-badge")].find((e) => e.dataset.pageId === id);
    return b ? { state: b.dataset.state, count: b.dataset.count === undefined ? null : Number(b.dataset.count) } : null;
  }, id);
}

async function waitBadge(page, id, expected) {
  await eventually(`badge ${decodeURIComponent(id)} on ${page.url()} to show ${expected}`, async () => {
    const b = await badgeOf(page, id);
    return b?.state === "live" && b.count === expected ? true : b;
  });
}

/** Opens `url` in a fresh context, recording its WebSockets and event-stream requests. */
async function openPage(browser, url) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.sockets = [];
  page.streams = [];
  page.on("websocket", (ws) => page.sockets.push(ws.url()));
  page.on("request", (r) => {
    if (new URL(r.url()).pathname.endsWith("/events")) page.streams.push(r.url());
  });
  await page.goto(url);
  return page;
}

const transportOf = (page) => page.evaluate(() => window.linkCounter.counter.transport);

async function run() {
  if (!BIN) fail("LINK_COUNTER_BIN is not set");
  if (!fs.existsSync(NGINX)) fail(`${NGINX} is missing: apt-get install -y nginx`);
  const hosts = { open: "counts.test", blocked: "blocked.test" };
  // nginx needs the service's address and the service the sites' origins:
  // the service listens on a port chosen first.
  const servicePort = await freePort();
  const upstream = `127.0.0.1:${servicePort}`;
  const open = await startNginx(hosts.open, upstream);
  // A proxy that refuses WebSockets: the upgrade headers never reach the service.
  const strip = (site) =>
    swap(
      swap(site, "proxy_set_header Upgrade $http_upgrade;", 'proxy_set_header Upgrade "";'),
      "proxy_set_header Connection $link_counter_connection;",
      'proxy_set_header Connection "";',
    );
  const blocked = await startNginx(hosts.blocked, upstream, strip);
  const origin = (host, port) => `https://${host}:${port}`;
  const svc = await startService(upstream, [origin(hosts.open, open.https), origin(hosts.blocked, blocked.https)]);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [...LAUNCH_ARGS, `--host-resolver-rules=MAP ${hosts.open} 127.0.0.1, MAP ${hosts.blocked} 127.0.0.1`],
  });
  const pages = [];
  try {
    // A viewer of c that is not a browser.
    const c1 = await viewer(svc.addr, ID.c);

    // As shipped: the embed uses a WebSocket.
    const viaWs = await openPage(browser, `${origin(hosts.open, open.https)}/pages/b`);
    pages.push(viaWs);
    await waitBadge(viaWs, ID.c, 1);
    assertEq(await transportOf(viaWs), "websocket", "transport through the shipped file");
    assertEq(viaWs.streams, [], "event streams through the shipped file");
    if (!viaWs.sockets.some((u) => u.startsWith(`wss://${hosts.open}:${open.https}/parties/page/`))) {
      fail(`no WebSocket through nginx: ${JSON.stringify(viaWs.sockets)}`);
    }

    // Upgrades stripped: the embed falls back to the event stream and shows
    // live, exact counts.
    const viaSse = await openPage(browser, `${origin(hosts.blocked, blocked.https)}/pages/b`);
    pages.push(viaSse);
    await waitBadge(viaSse, ID.c, 1);
    assertEq(await transportOf(viaSse), "sse", "transport with upgrades stripped");
    if (!viaSse.streams.some((u) => u.startsWith(`https://${hosts.blocked}:${blocked.https}/parties/page/`))) {
      fail(`no event stream through nginx: ${JSON.stringify(viaSse.streams)}`);
    }
    // A WebSocket reader and an event-stream reader of page b: two people.
    await waitBadge(viaSse, ID.b, 2);
    await waitBadge(viaWs, ID.b, 2);
    assertEq(await svc.counts([ID.b]), { [ID.b]: 2 }, "API count of b");
    // Live: c's viewers come and go; both pages follow, exactly.
    const c2 = await viewer(svc.addr, ID.c);
    await waitBadge(viaSse, ID.c, 2);
    await waitBadge(viaWs, ID.c, 2);
    c1.close();
    c2.close();
    await waitBadge(viaSse, ID.c, 0);
    await waitBadge(viaWs, ID.c, 0);
    // The event-stream reader leaves: it stops counting.
    await viaSse.context().close();
    pages.pop();
    await waitBadge(viaWs, ID.b, 1);
    console.log("ok: fallback through nginx (WebSocket as shipped, event stream with upgrades stripped)");
  } catch (e) {
    for (const [i, p] of pages.entries()) {
      await p.screenshot({ path: path.join(ARTIFACTS, `fallback-${i}.png`) }).catch(() => {});
    }
    throw e;
  } finally {
    await browser.close();
    open.stop();
    blocked.stop();
    svc.stop();
  }
}

fs.mkdirSync(ARTIFACTS, { recursive: true });
await run();
