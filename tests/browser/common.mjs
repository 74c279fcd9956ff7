// Shared by the browser test scripts (run.mjs, dashboard.mjs): how Chromium is
// launched, the generous deadline of every wait, and small helpers.

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
