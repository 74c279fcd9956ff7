// Shared by the browser test scripts (run.mjs, dashboard.mjs): how Chromium is
// launched, the generous deadline of every wait, small helpers, and a proxy
// that mounts the service under a path prefix.

import http from "node:http";
import net from "node:net";

import WebSocket from "ws";

/** Debian's chromium; never a downloaded browser. */
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

/** Deadline of every wait (generous: CI machines can be slow). */
export const PATIENCE = 30_000;

/** Headless flags; the background-networking ones keep Chromium off the (closed) network. */
export const LAUNCH_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-quic",
  "--no-first-run",
  "--disable-component-update",
  "--disable-sync",
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Fails the step with `message`. */
export function fail(message) {
  throw new Error(message);
}

/** Fails the step unless `actual` and `expected` serialize to the same JSON. */
export function assertEq(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) fail(`${what}: expected ${e}, got ${a}`);
}

/** Polls `check` (which returns true, or a description of what it saw) until true. */
export async function eventually(what, check, timeout = PATIENCE) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await check();
    if (last === true) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last seen: ${JSON.stringify(last)}`);
    await sleep(50);
  }
}

/** A raw WebSocket viewer of page `id` (a visitor that is not a browser). */
export function viewer(addr, id) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://${addr}/parties/page/${encodeURIComponent(id)}`);
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

/**
 * A reverse proxy on 127.0.0.1 (port 0) that mounts the service at `target`
 * ("host:port") under `prefix` ("/presence/") and nothing else, as nginx's
 * `location /presence/ { proxy_pass http://service/; }` does: "/presence/x"
 * is forwarded as "/x", WebSocket upgrades included; any other path gets 404.
 * `seen` lists every request it got, as `{method, url, upgrade}`.
 */
export function startPrefixProxy(prefix, target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
  const seen = [];
  const tunnels = new Set();
  const strip = (url) => (url.startsWith(prefix) ? url.slice(prefix.length - 1) : null);
  const server = http.createServer((req, res) => {
    seen.push({ method: req.method, url: req.url, upgrade: false });
    const path = strip(req.url);
    if (path === null) {
      res.writeHead(404, { "content-type": "text/plain" });
      res.end(`the proxy only forwards ${prefix}\n`);
      return;
    }
    const upstream = http.request({ host, port, method: req.method, path, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    upstream.on("error", (e) => {
      res.writeHead(502, { "content-type": "text/plain" });
      res.end(`upstream: ${e.message}\n`);
    });
    req.pipe(upstream);
  });
  server.on("upgrade", (req, socket, head) => {
    seen.push({ method: req.method, url: req.url, upgrade: true });
    const path = strip(req.url);
    if (path === null) {
      socket.end("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      return;
    }
    // The request head as it came (Origin included), with the prefix taken off.
    let lines = `${req.method} ${path} HTTP/1.1\r\n`;
    for (let i = 0; i < req.rawHeaders.length; i += 2) lines += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
    const upstream = net.connect(port, host, () => {
      upstream.write(`${lines}\r\n`);
      if (head.length) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    tunnels.add(upstream).add(socket);
    const end = () => {
      upstream.destroy();
      socket.destroy();
      tunnels.delete(upstream);
      tunnels.delete(socket);
    };
    upstream.on("error", end).on("close", end);
    socket.on("error", end).on("close", end);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () =>
      resolve({
        addr: `127.0.0.1:${server.address().port}`,
        seen,
        close() {
          for (const s of tunnels) s.destroy();
          server.closeAllConnections();
          server.close();
        },
      }),
    );
  });
}
