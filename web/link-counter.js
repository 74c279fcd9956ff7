// link-counter.js: live counts of the people viewing the pages a page links to.
//
// An ES module with no dependencies and no build step, served by link-counter
// at /link-counter.js. Two ways to use it (see README.md, "Add live counts to your site"):
//
// 1. Drop-in embed: <script type="module" src="https://HOST/link-counter.js"></script>
//    finds the page's links, connects, and renders a live badge next to each.
// 2. Library: import { LinkCounter, pageIdFromUrl } from "https://HOST/link-counter.js"
//    (importing it from another module does not start the embed).
//
// Wire protocol (PartyKit link-counter compatible): a WebSocket to
// /parties/page/{encodeURIComponent(page id)}?visitor={visitor id}, a
// `subscribe` with the linked ids (and "visitors": true) on every
// (re)connect, `update` messages applied as "set these ids".
// Where WebSockets are blocked (two attempts fail before opening), the same
// over Server-Sent Events: an EventSource on .../{page id}/events with the
// links in the query, the same messages as `data:` lines; a WebSocket is
// tried again now and then, and takes over once it opens.
//
// People, not tabs: the visitor id is random and lives in memory only. The
// tabs of one browser on one site agree on it over a BroadcastChannel (see
// TabGroup), so they count as one person; it is gone when the last tab closes.
// Nothing is written to the device (no cookie, no storage of any kind).
//
// "Now" means now: a tab hidden longer than the away time (default 1 minute,
// data-away-after) closes its connection and reopens it when visible again;
// the back/forward cache likewise (pagehide closes, pageshow reopens).
// Automated browsers and crawlers do not connect unless data-count-automation.
// On single-page sites the reader moves with the URL (pushState, replaceState,
// popstate, the Navigation API), or with linkCounter.setPage(id).
//
// Every URL it uses is under the service's base URL, path prefix included:
// loaded from https://HOST/presence/link-counter.js it connects to
// wss://HOST/presence/parties/page/... (and asks /presence/api/v1/origin).

export const VERSION = "0.2.0";

/** Most ids the server accepts in one subscribe (`max_links_per_subscribe`). */
export const MAX_LINKS = 256;

/** Longest page id, in UTF-8 bytes. */
const MAX_ID_BYTES = 256;

/**
 * The localStorage key where versions before 0.2 kept the visitor id; the
 * embed removes it (it stores nothing itself).
 */
export const OLD_VISITOR_STORAGE_KEY = "link-counter-visitor";

/** A valid visitor id (the server's rule): 8 to 64 characters of A-Z a-z 0-9 _ -. */
const VISITOR_ID = /^[A-Za-z0-9_-]{8,64}$/;

/** The figures a counter can show: distinct people, or open connections (tabs). */
const FIGURES = ["visitors", "connections"];
/** The name of the site's figure in `onUpdate`'s `changed` (no page id is empty). */
export const SITE = "";
/** Elements the embed fills with the site's figure. */
const SITE_SELECTOR = "[data-link-counter-site]";

/** Last path segments that stand for their directory ("/docs/index.html" is "/docs/"). */
const INDEX_FILES = ["index.html", "index.htm"];

/** The service's answer to "may this page's origin connect?" (CORS-readable), under its base URL. */
const ORIGIN_CHECK_PATH = "/api/v1/origin";

/** The service setting that lists the browser origins allowed to connect. */
export const ORIGINS_SETTING = "security.allowed_origins";

/**
 * Consecutive attempts that fail before opening after which the client asks
 * the service whether this page's origin is allowed (again). A client that
 * has never been connected asks after its first failure already.
 */
const ORIGIN_CHECK_EVERY = 3;

/** Close codes of the protocol that change what the client does. */
const CLOSE_GOING_AWAY = 1001; // server restarting: reconnect soon
const CLOSE_POLICY = 1008; // refused by policy: stop, retrying cannot help

/** Reconnection defaults (milliseconds). */
export const DEFAULT_BACKOFF = Object.freeze({
  /** Ceiling of the first retry's delay; doubles per failed attempt. */
  base: 1000,
  /** Largest ceiling. */
  cap: 30000,
  /** A connection open this long resets the attempt counter. */
  stableAfter: 10000,
  /**
   * Mean delay between attempts once the service said this page's origin is
   * not allowed (uniform in [refused / 2, 3 * refused / 2)): 5 minutes.
   */
  refused: 300000,
  /**
   * Over the event stream (WebSockets blocked): mean delay before a WebSocket
   * is tried again (uniform in [websocket / 2, 3 * websocket / 2)): 10 minutes.
   */
  websocket: 600000,
});

/** WebSocket attempts failing before they open after which the event stream is used. */
export const FALLBACK_AFTER = 2;

/**
 * The same once a WebSocket has opened on this page (failures are then more
 * likely a server restart than a blocking network): about half a minute of
 * the backoff.
 */
const FALLBACK_AFTER_OPEN = 6;

/**
 * Why `id` cannot be a page id, or null if it can: 1 to 256 UTF-8 bytes,
 * no control characters, no "/".
 */
export function pageIdProblem(id) {
  if (typeof id !== "string" || id.length === 0) return "is empty";
  if (new TextEncoder().encode(id).length > MAX_ID_BYTES) return `is longer than ${MAX_ID_BYTES} bytes`;
  if (id.includes("/")) return 'contains "/"';
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(id)) return "contains a control character";
  return null;
}

/**
 * The page id of a URL: its path (no query, no fragment), percent-decoded,
 * then percent-encoded as one segment with encodeURIComponent, so "/" becomes
 * "%2F": "/pages/b?x#y" -> "%2Fpages%2Fb", "/café/" -> "%2Fcaf%C3%A9%2F".
 * Decoding first makes "/caf%C3%A9", "/caf%c3%a9" and "/café" one page.
 * A last segment "index.html" or "index.htm" is dropped, so "/docs/index.html"
 * is the page "/docs/" ("%2Fdocs%2F"), unless `options.keepIndex`.
 * Returns null when the result is not a valid page id (longer than 256 bytes).
 *
 * @param {string} url
 * @param {string} [base]  what a relative `url` is relative to (default: the page's location)
 * @param {{keepIndex?: boolean}} [options]
 */
export function pageIdFromUrl(url, base = globalThis.location?.href, { keepIndex = false } = {}) {
  const path = new URL(url, base).pathname;
  let decoded = path;
  try {
    decoded = decodeURIComponent(path);
  } catch {
    // Not valid percent-encoding ("/100%"): use the path as it is.
  }
  if (!keepIndex) {
    const dir = decoded.lastIndexOf("/") + 1;
    if (INDEX_FILES.includes(decoded.slice(dir))) decoded = decoded.slice(0, dir);
  }
  const id = encodeURIComponent(decoded);
  return pageIdProblem(id) ? null : id;
}

/**
 * The service's base URL, "http(s)://host[:port][/prefix]" without a
 * trailing slash, from a `host` option: "https://counts.example.com",
 * "counts.example.com:8080" (https is assumed), "https://example.com/presence"
 * (a path prefix is kept), or a path on the page's own site, "/presence"
 * (resolved against `base`). ws: and wss: stand for http: and https:; a query
 * or fragment is ignored.
 */
export function serviceBase(host, base = globalThis.location?.href) {
  let url;
  try {
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(host)) url = new URL(host);
    else if (host.startsWith("/")) url = new URL(host, base);
    else url = new URL(`https://${host}`);
  } catch {
    throw new Error(`link-counter: host ${JSON.stringify(host)} is not a URL, a host name or a path`);
  }
  const scheme = url.protocol === "http:" || url.protocol === "ws:" ? "http:" : "https:";
  return `${scheme}//${url.host}${url.pathname.replace(/\/+$/, "")}`;
}

/**
 * The WebSocket URL of page `id` on `host` (anything `serviceBase` takes):
 * roomUrl("https://h/presence", "a") -> "wss://h/presence/parties/page/a".
 */
export function roomUrl(host, id) {
  return `${serviceBase(host).replace(/^http/, "ws")}/parties/page/${encodeURIComponent(id)}`;
}

/**
 * The event-stream URL of page `id` on `host`: its links in the query, each
 * percent-encoded (a comma inside an id is %2C), with the visitors map when
 * `visitors`, the site's figure when `site`, and the visitor id when there is one.
 */
export function eventsUrl(host, id, links, { visitors = false, site = false, visitor = null } = {}) {
  let url = `${serviceBase(host)}/parties/page/${encodeURIComponent(id)}/events?links=${links.map(encodeURIComponent).join(",")}`;
  if (visitors) url += "&visitors=true";
  if (site) url += "&site=true";
  if (visitor !== null) url += `&visitor=${visitor}`;
  return url;
}

/** The URL of the service's origin check (`/api/v1/origin` under its base URL). */
export function originCheckUrl(host) {
  return `${serviceBase(host)}${ORIGIN_CHECK_PATH}`;
}

/** A new random visitor id: 16 random bytes, base64url (22 characters). */
export function newVisitorId() {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** This page load's visitor id (made on first use, shared by its counters, kept in memory only). */
let pageLoadVisitor = null;

/** This page load's random visitor id: the default of a `LinkCounter` outside a `TabGroup`. */
export function pageLoadVisitorId() {
  pageLoadVisitor ??= newVisitorId();
  return pageLoadVisitor;
}

/** The BroadcastChannel name the tabs of one site share (a channel is per origin). */
export const TAB_CHANNEL = "link-counter";

/**
 * How long a tab that opens waits for other tabs' candidate ids before it
 * settles on the lowest (milliseconds). A tab that hears an id already
 * settled adopts it at once, without waiting.
 */
export const ASK_WINDOW = 200;

/**
 * One visitor id for all the tabs of this browser on this site, kept in
 * memory only: the tabs find each other over a `BroadcastChannel`.
 *
 * - A tab that opens sends `ask` with a random candidate id. Tabs that hold
 *   a settled id answer `id`; the newcomer adopts it at once.
 * - Tabs still in their ask window answer `candidate` with theirs. When the
 *   window (`ASK_WINDOW`, 200 ms) ends with no settled id heard, the tab
 *   settles on the lowest candidate it knows (its own included) and
 *   announces it: two tabs that start at the same moment hear each other's
 *   candidates and settle on the same one.
 * - Two settled ids that meet (messages that crossed) resolve the same way:
 *   the lower wins, the tabs holding the higher adopt it (`onChange`).
 *
 * Ids only ever go down, so the tabs agree after a few messages. Without
 * `BroadcastChannel` (or when it cannot be opened) the tab is a group of its
 * own with a random id. When the last tab closes, the id is gone.
 */
export class TabGroup {
  /**
   * @param {object} [options]
   * @param {(id: string) => void} [options.onChange]  the settled id changed (adopted a lower one)
   * @param {number} [options.askWindow]  milliseconds (default `ASK_WINDOW`)
   * @param {typeof BroadcastChannel|null} [options.BroadcastChannel]  default: the global one
   */
  constructor({ onChange = null, askWindow = ASK_WINDOW, BroadcastChannel: BC } = {}) {
    this.onChange = onChange;
    /** The settled id, or null while asking. */
    this.id = null;
    this._candidate = newVisitorId();
    this._heard = [];
    this._channel = null;
    this._timer = null;
    this.ready = new Promise((resolve) => {
      this._resolve = resolve;
    });
    this._Channel = BC === undefined ? globalThis.BroadcastChannel : BC;
    /** True while suspended (`suspend()`); false after `close()` too. */
    this._suspended = false;
    if (!this._open()) {
      this._settle(this._candidate);
      return;
    }
    this._post("ask", this._candidate);
    this._timer = setTimeout(() => this._settle(lowest([this._candidate, ...this._heard])), askWindow);
  }

  /** Leaves the group (the channel closes; the id is forgotten with the page). */
  close() {
    clearTimeout(this._timer);
    this._channel?.close();
    this._channel = null;
    this._suspended = false;
  }

  /**
   * Leaves the channel while the page sits in the back/forward cache (an open
   * channel can keep a page out of it, or get it evicted), keeping the id; a
   * tab still asking settles on what it heard.
   */
  suspend() {
    if (!this._channel) return;
    this._channel.close();
    this._channel = null;
    this._suspended = true;
    if (this.id === null) this._settle(lowest([this._candidate, ...this._heard]));
  }

  /** Rejoins after `suspend()` and announces the id (the lower id wins, as always). */
  resume() {
    if (!this._suspended) return;
    this._suspended = false;
    if (this._open()) this._post("id", this.id);
  }

  /** Opens the channel; false when there is none. */
  _open() {
    try {
      if (this._Channel) this._channel = new this._Channel(TAB_CHANNEL);
    } catch {
      this._channel = null; // e.g. an opaque origin
    }
    if (this._channel) this._channel.onmessage = (event) => this._message(event.data);
    return this._channel !== null;
  }

  _post(type, id) {
    try {
      this._channel?.postMessage({ type, id });
    } catch {
      // The channel closed under us: nothing to tell.
    }
  }

  _message(msg) {
    if (!msg || typeof msg !== "object" || typeof msg.id !== "string" || !VISITOR_ID.test(msg.id)) return;
    if (this.id === null) {
      if (msg.type === "id") {
        this._settle(msg.id);
      } else if (msg.type === "ask" || msg.type === "candidate") {
        this._heard.push(msg.id);
        if (msg.type === "ask") this._post("candidate", this._candidate);
      }
      return;
    }
    if (msg.type === "ask") {
      this._post("id", this.id);
    } else if (msg.type === "id" && msg.id !== this.id) {
      if (msg.id < this.id) {
        this.id = msg.id;
        this.onChange?.(msg.id);
      } else {
        this._post("id", this.id); // the other side adopts ours
      }
    }
  }

  _settle(id) {
    clearTimeout(this._timer);
    this._timer = null;
    this.id = id;
    this._heard = [];
    this._post("id", id);
    this._resolve(id);
  }
}

/** The lowest of `ids` (plain string order: the same in every tab). */
function lowest(ids) {
  return ids.reduce((a, b) => (b < a ? b : a));
}

/** Throws unless `id` is a valid visitor id or null. */
function checkVisitor(id) {
  if (id !== null && !(typeof id === "string" && VISITOR_ID.test(id))) {
    throw new Error(`link-counter: visitor id ${JSON.stringify(id)} is not 8 to 64 characters of A-Z a-z 0-9 _ -`);
  }
}

/**
 * One live connection for one page: it counts as a viewer of `page` (as
 * visitor `visitor`) and keeps the counts of `links` current: by default the
 * number of people on each (distinct visitors), with `count: "connections"`
 * the number of open connections (tabs).
 *
 * Counts are `number` when live and `null` when unknown: before the first
 * update after a (re)connect, and whenever the connection is down. A stale
 * number is never presented as live.
 */
export class LinkCounter {
  /**
   * @param {object} options
   * @param {string} options.host   the service, e.g. "https://counts.example.com" or
   *   "https://example.com/presence" (a path prefix is kept; see `serviceBase`)
   * @param {string} options.page   this page's id
   * @param {string[]} [options.links]  ids whose counts to follow
   * @param {"visitors"|"connections"} [options.count]  which figure `get` and `counts` give
   *   (default "visitors": people; "connections": tabs)
   * @param {boolean} [options.site]  also follow the site's figure: the distinct people on
   *   any of its pages (`site`; default false)
   * @param {string|null} [options.visitor]  the visitor id to send (default: `pageLoadVisitorId()`;
   *   null: none, the connection is a visitor of its own)
   * @param {boolean} [options.paused]  start paused (no connection until `resume()`)
   * @param {(counts: Map<string, number|null>, info: {connected: boolean, changed: string[]}) => void} [options.onUpdate]
   * @param {{base?: number, cap?: number, stableAfter?: number, refused?: number}} [options.backoff]
   * @param {typeof WebSocket} [options.WebSocket]  a WebSocket implementation (default: the global one)
   * @param {typeof EventSource} [options.EventSource]  for the fallback where WebSockets are blocked
   *   (default: the global one; none: no fallback)
   * @param {typeof fetch} [options.fetch]  for the origin check (default: the global one; none: no check)
   * @param {Console} [options.logger]
   */
  constructor({
    host,
    page,
    links = [],
    count = "visitors",
    site = false,
    visitor,
    onUpdate = null,
    backoff = {},
    WebSocket: WS,
    EventSource: ES,
    fetch: fetchImpl,
    logger = console,
    paused = false,
  }) {
    const problem = pageIdProblem(page);
    if (problem) throw new Error(`link-counter: page id ${JSON.stringify(page)} ${problem}`);
    if (!FIGURES.includes(count)) throw new Error(`link-counter: count ${JSON.stringify(count)} is not "visitors" or "connections"`);
    const id = visitor === undefined ? pageLoadVisitorId() : visitor;
    checkVisitor(id);
    this.page = page;
    this.figure = count;
    this.visitor = id;
    this.base = serviceBase(host);
    this.onUpdate = onUpdate;
    this._backoff = { ...DEFAULT_BACKOFF, ...backoff };
    this._WS = WS ?? globalThis.WebSocket;
    this._ES = ES ?? globalThis.EventSource ?? null;
    /** "websocket", or "sse" while WebSockets are blocked. */
    this._transport = "websocket";
    /** Consecutive WebSocket attempts that failed before opening. */
    this._wsFailures = 0;
    /** A WebSocket has opened on this page. */
    this._wsEverOpened = false;
    /** Over the event stream: when to try a WebSocket again (Date.now()). */
    this._wsRetryAt = 0;
    /** A second connection opening to take over the current one (make before break). */
    this._spare = null;
    this._spareTimer = null;
    this._fetch = fetchImpl ?? globalThis.fetch?.bind(globalThis) ?? null;
    this._log = logger;
    this._links = [];
    this._counts = new Map();
    this._wantSite = Boolean(site);
    /** The site's figure as last told, or null when unknown. */
    this._site = null;
    /** id -> {connections, visitors} as last told (visitors null without the map), or null. */
    this._tallies = new Map();
    this._ws = null;
    this._state = "idle";
    this._attempt = 0;
    this._retryTimer = null;
    this._stableTimer = null;
    /** True once a connection has opened. */
    this._everOpened = false;
    /** Consecutive attempts that closed before opening. */
    this._failedOpens = 0;
    /** An origin check is in flight. */
    this._checking = false;
    /** The service said this page's origin is not allowed (until a connection opens). */
    this._refused = false;
    this._onOnline = () => {
      // The network is back: do not wait out a long backoff (a refused
      // origin is not a network problem: keep its slow pace).
      if (this._state === "waiting" && !this._refused) this._schedule(this._backoff.base);
    };
    globalThis.addEventListener?.("online", this._onOnline);
    this._setLinks(links, false);
    if (paused) this._state = "paused";
    else this._connect();
  }

  /** The WebSocket URL: this page's room, with the visitor id when there is one. */
  get url() {
    return roomUrl(this.base, this.page) + (this.visitor === null ? "" : `?visitor=${this.visitor}`);
  }

  /** The event-stream URL: this page's stream with its links (and the visitor id). */
  get eventsUrl() {
    return eventsUrl(this.base, this.page, this._links, {
      visitors: this.figure === "visitors",
      site: this._wantSite,
      visitor: this.visitor,
    });
  }

  /** "websocket", or "sse" (Server-Sent Events) while WebSockets are blocked. */
  get transport() {
    return this._transport;
  }

  /** "connecting", "open", "waiting" (to reconnect), "paused" or "stopped". */
  get state() {
    return this._state;
  }

  /** True while the connection is open. */
  get connected() {
    return this._state === "open";
  }

  /**
   * True when the service said this page's origin may not connect
   * (`security.allowed_origins`); it then retries only every few minutes,
   * until a connection opens.
   */
  get refused() {
    return this._refused;
  }

  /** The followed ids, in order. */
  get links() {
    return [...this._links];
  }

  /** A copy of the counts: id -> number, or null when unknown. */
  get counts() {
    return new Map(this._counts);
  }

  /** The people on any page of the site (with `site: true`): a number, or null when unknown. */
  get site() {
    return this._site;
  }

  /** The count of `id` (the `count` option's figure): a number, or null when unknown or not followed. */
  get(id) {
    return this._counts.get(id) ?? null;
  }

  /**
   * Both figures of `id` as last told, `{connections, visitors}`, or null when
   * unknown (`visitors` is null with `count: "connections"`).
   */
  tally(id) {
    return this._tallies.get(id) ?? null;
  }

  /**
   * Follows another set of ids on the same connection (a new `subscribe`).
   * Ids that stay keep their counts; new ones are unknown until the server's
   * answer, which comes right after the subscribe.
   */
  setLinks(ids) {
    this._setLinks(ids, true);
  }

  /**
   * Counts this connection as a viewer of page `id` from now on: the
   * connection to the old page closes normally and one to the new page
   * opens at once (its counts come with the first update). A paused
   * counter only remembers it.
   */
  setPage(id) {
    const problem = pageIdProblem(id);
    if (problem) throw new Error(`link-counter: page id ${JSON.stringify(id)} ${problem}`);
    if (id === this.page) return;
    this.page = id;
    this._reopen();
  }

  /** Sends visitor id `id` (or none: null) from now on, reconnecting if connected. */
  setVisitor(id) {
    checkVisitor(id);
    if (id === this.visitor) return;
    this.visitor = id;
    this._reopen();
  }

  /**
   * Closes the connection normally and stays closed (no retries) until
   * `resume()`: counts become unknown. Used when the reader is away.
   */
  pause() {
    if (this._state === "paused" || this._state === "stopped") return;
    this._disconnect("paused");
  }

  /** Connects again after `pause()` (at once). */
  resume() {
    if (this._state !== "paused") return;
    this._attempt = 0;
    this._connect();
  }

  /** Closes the connection for good. */
  close() {
    this._stop();
    globalThis.removeEventListener?.("online", this._onOnline);
  }

  _setLinks(ids, send) {
    const unique = [];
    const seen = new Set();
    for (const id of ids) {
      if (seen.has(id)) continue;
      const problem = pageIdProblem(id);
      if (problem) {
        this._log.warn(`link-counter: ignoring link id ${JSON.stringify(id)}: it ${problem}`);
        continue;
      }
      if (unique.length === MAX_LINKS) {
        this._log.warn(`link-counter: following only the first ${MAX_LINKS} linked pages`);
        break;
      }
      seen.add(id);
      unique.push(id);
    }
    const changed = [];
    for (const id of this._counts.keys()) {
      if (!seen.has(id)) {
        this._counts.delete(id);
        this._tallies.delete(id);
        changed.push(id);
      }
    }
    for (const id of unique) {
      if (!this._counts.has(id)) {
        this._counts.set(id, null);
        changed.push(id);
      }
    }
    this._links = unique;
    if (send && this._state === "open") {
      // A stream's links are in its URL: a new stream takes over (make before break).
      if (this._transport === "sse") this._replaceWith("sse");
      else this._subscribe();
    }
    if (changed.length) this._emit(changed);
  }

  _subscribe() {
    if (this._transport === "sse") return; // in the stream's URL
    const msg = { type: "subscribe", links: this._links };
    if (this.figure === "visitors") msg.visitors = true;
    if (this._wantSite) msg.site = true;
    this._ws.send(JSON.stringify(msg));
  }

  _emit(changed) {
    if (!this.onUpdate) return;
    try {
      this.onUpdate(this.counts, { connected: this.connected, changed });
    } catch (e) {
      this._log.error("link-counter: onUpdate threw", e);
    }
  }

  /** Replaces a live or pending connection with one to the current URL, at once. */
  _reopen() {
    if (this._state === "paused" || this._state === "stopped") return;
    this._disconnect("connecting");
    this._attempt = 0;
    this._connect();
  }

  /**
   * Closes the connection (if any) normally, cancels timers and enters
   * `state`; counts become unknown.
   */
  _disconnect(state) {
    this._state = state;
    clearTimeout(this._retryTimer);
    clearTimeout(this._stableTimer);
    this._dropSpare();
    const ws = this._ws;
    this._ws = null; // its close event is then ignored: no retry
    if (ws) ws.close(1000);
    this._forget();
  }

  /**
   * Opens a connection over `kind` ("websocket" to `this.url`, "sse" to
   * `this.eventsUrl`): an object with `send(text)`, `close(code)` and the
   * handlers `onopen`, `onmessage({data})`, `onclose({code, reason})`,
   * `onerror` (a WebSocket, or an EventSource behind that face). The one
   * place a connection is made.
   */
  _openTransport(kind) {
    if (kind === "websocket") return new this._WS(this.url);
    const es = new this._ES(this.eventsUrl);
    const face = {
      onopen: null,
      onmessage: null,
      onclose: null,
      onerror: null,
      send() {},
      close() {
        es.close();
      },
    };
    es.onopen = () => face.onopen?.();
    es.onmessage = (event) => face.onmessage?.({ data: event.data });
    // The stream failed or ended: the counter reconnects itself (with its
    // backoff and jitter), not the EventSource.
    es.onerror = () => {
      es.close();
      face.onclose?.({ code: 1006, reason: "" });
    };
    return face;
  }

  _connect() {
    this._retryTimer = null;
    this._state = "connecting";
    // Over the event stream, a reconnect tries a WebSocket once its time came.
    if (this._transport === "sse" && Date.now() >= this._wsRetryAt) this._transport = "websocket";
    const kind = this._transport;
    let ws;
    try {
      ws = this._openTransport(kind);
    } catch (e) {
      this._log.error(`link-counter: cannot open ${kind === "sse" ? this.eventsUrl : this.url}`, e);
      this._state = "stopped";
      return;
    }
    this._attach(ws, false);
  }

  /** Makes `ws` the connection (`open`: it is open already). */
  _attach(ws, open) {
    this._ws = ws;
    let opened = false;
    const onOpen = () => {
      opened = true;
      this._everOpened = true;
      this._failedOpens = 0;
      if (this._transport === "websocket") {
        this._wsFailures = 0;
        this._wsRetryAt = 0;
        this._wsEverOpened = true;
      }
      this._refused = false;
      this._state = "open";
      clearTimeout(this._stableTimer);
      this._stableTimer = setTimeout(() => {
        this._attempt = 0;
      }, this._backoff.stableAfter);
      // On every (re)connect: the server forgets a connection's links with it.
      this._subscribe();
      if (this._transport === "sse") this._scheduleProbe();
    };
    ws.onopen = () => {
      if (this._ws !== ws) return;
      onOpen();
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._message(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._closed(event.code, event.reason, opened);
    };
    // An error is always followed by close; nothing to do here.
    ws.onerror = () => {};
    if (open) onOpen();
  }

  /** Over the event stream: a WebSocket is tried again in about `backoff.websocket`. */
  _scheduleProbe() {
    clearTimeout(this._spareTimer);
    const delay = Math.max(0, this._wsRetryAt - Date.now());
    this._spareTimer = setTimeout(() => this._replaceWith("websocket"), delay);
  }

  /**
   * Opens a second connection over `kind` while the current one stays open;
   * once it opens it takes over and the old one closes (make before break:
   * the counts stay shown). A WebSocket that fails leaves the stream in
   * place until the next try.
   */
  _replaceWith(kind) {
    this._dropSpare();
    if (this._state !== "open") return;
    let spare;
    try {
      spare = this._openTransport(kind);
    } catch {
      if (kind === "websocket") this._wsRetryLater();
      return;
    }
    this._spare = spare;
    spare.onopen = () => {
      if (this._spare !== spare) return;
      this._spare = null;
      const old = this._ws;
      this._ws = null;
      if (old) old.close(1000);
      this._transport = kind;
      this._attach(spare, true);
    };
    spare.onclose = () => {
      if (this._spare !== spare) return;
      this._spare = null;
      if (kind === "websocket") this._wsRetryLater();
      else this._reopen(); // a new stream failed: reconnect with the backoff
    };
    spare.onmessage = () => {};
    spare.onerror = () => {};
  }

  /** Closes a spare connection still opening, and its timer. */
  _dropSpare() {
    clearTimeout(this._spareTimer);
    this._spareTimer = null;
    const spare = this._spare;
    this._spare = null;
    if (spare) spare.close(1000);
  }

  /** Over the event stream: the next WebSocket try in about `backoff.websocket`. */
  _wsRetryLater() {
    this._wsRetryAt = Date.now() + this._backoff.websocket * (0.5 + Math.random());
    if (this._transport === "sse" && this._state === "open") this._scheduleProbe();
  }

  _message(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this._log.warn("link-counter: ignoring a message that is not JSON");
      return;
    }
    if (msg?.type === "update" && msg.connections && typeof msg.connections === "object") {
      const figure = (n) => Number.isInteger(n) && n >= 0;
      // An update carries the visitors map when asked for; a service that
      // does not count visitors sends connections only, which are then shown.
      const visitors = this.figure === "visitors" && msg.visitors && typeof msg.visitors === "object" ? msg.visitors : null;
      const changed = [];
      for (const [id, connections] of Object.entries(msg.connections)) {
        // Only ids still followed: an update may cross a new subscribe.
        if (!this._counts.has(id) || !figure(connections)) continue;
        const people = visitors && figure(visitors[id]) ? visitors[id] : null;
        this._tallies.set(id, { connections, visitors: people });
        const n = people ?? connections;
        if (this._counts.get(id) !== n) {
          this._counts.set(id, n);
          changed.push(id);
        }
      }
      if (this._wantSite && figure(msg.site) && msg.site !== this._site) {
        this._site = msg.site;
        changed.push(SITE);
      }
      if (changed.length) this._emit(changed);
    } else if (msg?.type === "error") {
      this._log.warn(`link-counter: server refused a request: ${msg.code}: ${msg.message}`);
    }
  }

  /** The connection closed; `opened` is false when it never opened (a failed attempt). */
  _closed(code, reason, opened) {
    clearTimeout(this._stableTimer);
    this._dropSpare();
    this._ws = null;
    this._state = code === CLOSE_POLICY ? "stopped" : "waiting";
    this._forget();
    if (code === CLOSE_POLICY) {
      this._log.error(
        `link-counter: the server refused this page (close 1008${reason ? `: ${reason}` : ""}); not reconnecting`,
      );
      return;
    }
    if (!opened) this._failedOpens++;
    if (this._refused) {
      this._retrySlowly();
      return;
    }
    if (this._fallBack(opened)) return;
    if (code === CLOSE_GOING_AWAY) this._attempt = 0; // a restart: come back soon
    // Full jitter: uniform in [0, min(cap, base * 2^attempt)), so thousands
    // of tabs that lost the same server do not come back in step.
    const ceiling = Math.min(this._backoff.cap, this._backoff.base * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    this._schedule(ceiling);
    // A browser hides why an upgrade failed (a 403 for a refused origin
    // looks like a network error): ask the service.
    const first = this._failedOpens === 1 && !this._everOpened;
    if (!opened && (first || this._failedOpens % ORIGIN_CHECK_EVERY === 0)) this._checkOrigin();
  }

  /**
   * After a WebSocket attempt that did not open: with `FALLBACK_AFTER` of
   * them in a row (or a retry over WebSocket while on the stream), switches
   * to the event stream and reconnects soon. True when it did.
   */
  _fallBack(opened) {
    if (this._transport !== "websocket" || opened || !this._ES) return false;
    this._wsFailures++;
    const retrying = this._wsRetryAt > 0;
    // Where WebSockets worked before, failures are more likely a restart.
    const after = this._wsEverOpened ? FALLBACK_AFTER_OPEN : FALLBACK_AFTER;
    if (this._wsFailures < after && !retrying) return false;
    if (!retrying) {
      this._log.info?.("link-counter: WebSocket connections fail here; using an event stream (Server-Sent Events)");
    }
    this._transport = "sse";
    this._wsFailures = 0;
    this._wsRetryLater();
    this._schedule(this._backoff.base);
    return true;
  }

  _schedule(ceiling) {
    this._retryIn(Math.random() * ceiling);
  }

  /** The next attempt once the origin was refused: about every `backoff.refused`. */
  _retrySlowly() {
    this._retryIn(this._backoff.refused * (0.5 + Math.random()));
  }

  _retryIn(delay) {
    clearTimeout(this._retryTimer);
    this._state = "waiting";
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  /**
   * Asks the service whether this page's origin may connect (the check its
   * upgrade makes). If not: one console.error naming the origin and the
   * setting, and from then on slow retries instead of the backoff. Any other
   * outcome (unreachable, an older service without the check, allowed)
   * leaves the backoff as it is.
   */
  async _checkOrigin() {
    if (this._checking || this._refused || !this._fetch) return;
    this._checking = true;
    let answer = null;
    try {
      // POST: a browser sends Origin with it even to its own origin (a GET
      // to the same origin goes without), and without a body or custom
      // headers it needs no CORS preflight.
      const res = await this._fetch(originCheckUrl(this.base), {
        method: "POST",
        mode: "cors",
        credentials: "omit",
        cache: "no-store",
      });
      if (res.ok) answer = await res.json();
    } catch {
      // Unreachable or not JSON: an ordinary failure, the backoff goes on.
    } finally {
      this._checking = false;
    }
    if (answer?.allowed !== false || this._refused || this._state === "open" || this._state === "stopped") return;
    this._refused = true;
    const origin = typeof answer.origin === "string" ? answer.origin : (globalThis.location?.origin ?? "(none)");
    const minutes = Math.round(this._backoff.refused / 60000);
    this._log.error(
      `link-counter: this page's origin ${origin} is not allowed to connect to ${this.base}: ` +
        `add ${origin} to ${ORIGINS_SETTING} in the service's configuration ` +
        `(LINK_COUNTER__SECURITY__ALLOWED_ORIGINS in its environment). ` +
        `Counts stay unknown; retrying about every ${minutes > 0 ? `${minutes} minutes` : `${this._backoff.refused} ms`}.`,
    );
    if (this._state === "waiting") this._retrySlowly(); // replaces the backoff's retry
  }

  /** Marks every count unknown (the connection that kept them live is gone). */
  _forget() {
    this._tallies.clear();
    const changed = [];
    if (this._site !== null) {
      this._site = null;
      changed.push(SITE);
    }
    for (const [id, n] of this._counts) {
      if (n !== null) {
        this._counts.set(id, null);
        changed.push(id);
      }
    }
    if (changed.length) this._emit(changed);
  }

  _stop() {
    this._disconnect("stopped");
  }
}

// ---------------------------------------------------------------------------
// Drop-in embed

const BADGE_CLASS = "link-counter-badge";
const STYLE_ID = "link-counter-style";

/** Default badge styles: zero specificity (`:where`), so any site rule wins. */
const STYLES = `
:where(.${BADGE_CLASS}) {
  display: inline-block;
  box-sizing: border-box;
  min-width: var(--link-counter-min-width, 2.4em);
  margin-inline-start: var(--link-counter-gap, 0.5em);
  padding: var(--link-counter-padding, 0 0.5em);
  border-radius: var(--link-counter-radius, 999px);
  background: var(--link-counter-bg, #2563eb);
  color: var(--link-counter-color, #fff);
  font-family: var(--link-counter-font-family, system-ui, sans-serif);
  font-size: var(--link-counter-font-size, 0.8em);
  font-weight: var(--link-counter-font-weight, 600);
  line-height: 1.6;
  font-variant-numeric: tabular-nums;
  text-align: center;
  vertical-align: baseline;
  white-space: nowrap;
  transition: background-color 0.2s, color 0.2s;
}
:where(.${BADGE_CLASS}[data-state="unknown"]) {
  background: var(--link-counter-unknown-bg, #d1d5db);
  color: var(--link-counter-unknown-color, #374151);
}
.${BADGE_CLASS} > .link-counter-sr {
  position: absolute;
  width: 1px;
  height: 1px;
  overflow: hidden;
  clip-path: inset(50%);
  white-space: nowrap;
}
`;

/** Default badge texts. */
export const DEFAULT_LABELS = Object.freeze({
  /** What the badge shows while the count is unknown. */
  unknownText: "–",
  /** Screen-reader and tooltip text while unknown. */
  unknown: () => "live count unavailable",
  /** Screen-reader and tooltip text for a live count of people (the default). */
  live: (n) => `${n} ${n === 1 ? "person" : "people"} viewing now`,
  /** Screen-reader and tooltip text for a live count of tabs (`data-count="connections"`). */
  liveConnections: (n) => `${n} ${n === 1 ? "tab" : "tabs"} open now`,
});

function injectStyles(doc) {
  if (doc.getElementById(STYLE_ID)) return;
  const style = doc.createElement("style");
  style.id = STYLE_ID;
  style.textContent = STYLES;
  // First in <head>, so the site's own rules come later and win.
  doc.head.prepend(style);
}

function renderBadge(badge, count, labels, figure) {
  const live = typeof count === "number";
  const state = live ? "live" : "unknown";
  const text = live ? String(count) : labels.unknownText;
  const label = !live ? labels.unknown() : figure === "connections" ? labels.liveConnections(count) : labels.live(count);
  if (badge.dataset.state === state && badge.dataset.count === (live ? text : undefined) && badge.title === label) {
    return; // unchanged: no DOM writes
  }
  badge.dataset.state = state;
  if (live) badge.dataset.count = text;
  else delete badge.dataset.count;
  badge.title = label;
  const shown = badge.ownerDocument.createElement("span");
  shown.setAttribute("aria-hidden", "true");
  shown.textContent = text;
  const sr = badge.ownerDocument.createElement("span");
  sr.className = "link-counter-sr";
  sr.textContent = ` (${label})`;
  badge.replaceChildren(shown, sr);
}

/** How long a hidden tab keeps counting by default: 1 minute (docs/EMBED.md says why). */
export const DEFAULT_AWAY_AFTER = 60_000;

/**
 * Milliseconds of a `data-away-after` value: "90s", "2m", "1500ms", "1h",
 * or a bare number of seconds; "off" (hidden tabs keep counting) is null.
 * Returns undefined when the value is not one of those.
 */
export function parseAwayAfter(value) {
  const v = String(value).trim().toLowerCase();
  if (v === "off" || v === "never" || v === "false") return null;
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?$/.exec(v);
  if (!m) return undefined;
  const unit = { ms: 1, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 }[m[2] ?? "s"];
  return Math.round(Number(m[1]) * unit);
}

/**
 * User-agent tokens of crawlers and headless browsers that run JavaScript:
 * the embed does not connect for them (nor when `navigator.webdriver` is
 * set) unless the page says `data-count-automation`. The service refuses
 * the crawlers it knows as well (`security.bot_user_agents`).
 */
export const CRAWLER_USER_AGENT =
  /googlebot|google-inspectiontool|googleother|adsbot-google|mediapartners-google|storebot-google|bingbot|bingpreview|slurp|duckduckbot|baiduspider|yandexbot|yandexrenderresourcesbot|sogou|exabot|seznambot|applebot|petalbot|facebookexternalhit|meta-externalagent|twitterbot|linkedinbot|ahrefsbot|semrushbot|mj12bot|dotbot|bytespider|gptbot|chatgpt-user|oai-searchbot|claudebot|claude-user|perplexitybot|ccbot|amazonbot|ia_archiver|archive\.org_bot|headlesschrome|phantomjs|lighthouse|chrome-lighthouse/i;

/** Whether `nav` (a Navigator) is an automated browser or a crawler. */
export function isAutomated(nav = globalThis.navigator) {
  return Boolean(nav?.webdriver) || CRAWLER_USER_AGENT.test(nav?.userAgent ?? "");
}

/**
 * Starts the embed on `doc`: picks the links, follows their pages and keeps
 * a badge next to each. Re-scans when the DOM changes (links added, removed
 * or edited) and re-subscribes on the same connection when the set changes.
 * Follows the URL on single-page sites, closes while the tab is away, and
 * does nothing in an automated browser (see the module's header).
 *
 * @param {object} [options]
 * @param {string} [options.host]  the service, path prefix included (default: the
 *   folder this module was loaded from: https://h/presence/link-counter.js -> https://h/presence)
 * @param {string} [options.page]  this page's id (default: derived from location, and
 *   following it when the URL changes without a reload)
 * @param {"auto"|"all"|"marked"} [options.links]  which links get a badge
 * @param {"visitors"|"connections"} [options.count]  what a badge counts: people (default) or tabs
 * @param {boolean} [options.keepIndex]  "/x/index.html" stays its own page (default: it is "/x/")
 * @param {number|null} [options.awayAfter]  ms a hidden tab keeps counting (null: always)
 * @param {boolean} [options.countAutomation]  connect in automated browsers and crawlers too
 * @returns {{counter: LinkCounter|null, rescan: () => void, setPage: (id: string) => void, stop: () => void}}
 */
export function embed(options = {}) {
  const doc = options.document ?? document;
  const win = doc.defaultView ?? globalThis;
  const log = options.logger ?? console;
  forgetOldVisitorId(win);
  if (!options.countAutomation && isAutomated(win.navigator)) {
    log.info("link-counter: an automated browser or a crawler: not counted (data-count-automation counts it)");
    return { counter: null, automated: true, rescan() {}, setPage() {}, stop() {} };
  }
  const labels = { ...DEFAULT_LABELS, ...(options.labels ?? {}) };
  const mode = options.links ?? "auto";
  let figure = options.count ?? "visitors";
  if (!FIGURES.includes(figure)) {
    log.warn(`link-counter: data-count ${JSON.stringify(figure)} is not "visitors" or "connections"; counting people`);
    figure = "visitors";
  }
  const idOptions = { keepIndex: Boolean(options.keepIndex) };
  const host = serviceBase(options.host ?? new URL(".", import.meta.url).href, win.location.href);
  const page = options.page ?? pageIdFromUrl(win.location.href, undefined, idOptions);
  const badges = new Map(); // link element -> badge element
  /** The page id follows the URL (no data-page, no setPage call). */
  let followUrl = options.page === undefined;

  injectStyles(doc);

  let counter = null;
  let group = null;
  const problem = pageIdProblem(page);
  if (problem) {
    log.error(`link-counter: this page's id ${JSON.stringify(page)} ${problem}; set data-page on the script tag`);
  } else {
    // With an explicit visitor option the tabs are not grouped.
    group = options.visitor === undefined ? new TabGroup({ onChange: (id) => counter.setVisitor(id) }) : null;
    counter = new LinkCounter({
      host,
      page,
      count: figure,
      // Elements present when the embed starts ask for the site's figure.
      site: doc.querySelector(SITE_SELECTOR) !== null,
      visitor: group ? group._candidate : options.visitor,
      backoff: options.backoff,
      WebSocket: options.WebSocket,
      EventSource: options.EventSource,
      fetch: options.fetch,
      logger: log,
      paused: true,
      onUpdate: () => renderAll(),
    });
  }

  function linkId(a) {
    if (a.dataset.pageId !== undefined) return pageIdProblem(a.dataset.pageId) ? null : a.dataset.pageId;
    let url;
    try {
      url = new URL(a.href, win.location.href);
    } catch {
      return null;
    }
    if (url.origin !== win.location.origin) return null; // same site only
    return pageIdFromUrl(url.href, undefined, idOptions);
  }

  function chosenLinks() {
    const all = [...doc.querySelectorAll("a[href]")].filter(
      (a) => a.dataset.linkCounter !== "off" && !a.closest(`.${BADGE_CLASS}`),
    );
    const marked = all.filter((a) => a.dataset.linkCounter !== undefined);
    const useMarked = mode === "marked" || (mode === "auto" && marked.length > 0);
    return useMarked ? marked : all;
  }

  function renderAll() {
    for (const [a, badge] of badges) {
      renderBadge(badge, counter ? counter.get(badge.dataset.pageId) : null, labels, figure);
    }
    // The site's figure, as text; empty while unknown (never a stale number).
    const site = counter?.site;
    const text = typeof site === "number" ? String(site) : "";
    for (const el of doc.querySelectorAll(SITE_SELECTOR)) {
      if (el.textContent !== text) el.textContent = text;
    }
  }

  function rescan() {
    const seen = new Set();
    const ids = [];
    for (const a of chosenLinks()) {
      const id = linkId(a);
      if (id === null) continue;
      seen.add(a);
      ids.push(id);
      let badge = badges.get(a);
      if (!badge) {
        // Reuse a placeholder rendered by the site (no insertion, no shift).
        const next = a.nextElementSibling;
        badge = next?.classList.contains(BADGE_CLASS) && !next.dataset.pageId ? next : doc.createElement("span");
        badge.classList.add(BADGE_CLASS);
        badges.set(a, badge);
      }
      if (a.nextElementSibling !== badge) a.after(badge);
      badge.dataset.pageId = id;
    }
    for (const [a, badge] of badges) {
      if (!seen.has(a)) {
        badge.remove();
        badges.delete(a);
      }
    }
    if (counter) {
      const unique = [...new Set(ids)];
      const current = counter.links;
      if (unique.length !== current.length || unique.some((id, i) => id !== current[i])) {
        counter.setLinks(unique);
      }
    }
    renderAll();
  }

  // The observer already batches a burst of DOM changes into one call; our
  // own badge changes are ignored, so a rescan does not trigger another.
  const observer = new win.MutationObserver((records) => {
    const relevant = records.some((r) => {
      const node = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      if (node?.closest?.(`.${BADGE_CLASS}`) || node?.closest?.(SITE_SELECTOR)) return false;
      if (r.type === "childList") {
        const nodes = [...r.addedNodes, ...r.removedNodes];
        return nodes.some((n) => !(n.nodeType === 1 && n.classList.contains(BADGE_CLASS)));
      }
      return true;
    });
    if (relevant) rescan();
  });
  observer.observe(doc.documentElement, {
    subtree: true,
    childList: true,
    attributes: true,
    attributeFilter: ["href", "data-page-id", "data-link-counter"],
  });

  const presence = counter ? watchPresence(win, doc, counter, group, options.awayAfter, log) : null;
  const navigation = watchUrl(win, () => {
    if (counter && followUrl) {
      const id = pageIdFromUrl(win.location.href, undefined, idOptions);
      if (id !== null) counter.setPage(id);
    }
    rescan(); // relative links resolve against the new URL
  });

  rescan();
  return {
    counter,
    rescan,
    /** Counts this tab on page `id` from now on (and stops following the URL). */
    setPage(id) {
      if (!counter) throw new Error("link-counter: this page has no counter (its id is invalid)");
      counter.setPage(id);
      followUrl = false;
    },
    stop() {
      observer.disconnect();
      navigation.stop();
      presence?.stop();
      group?.close();
      counter?.close();
      for (const badge of badges.values()) badge.remove();
      badges.clear();
    },
  };
}

/** Removes the visitor id versions before 0.2 kept in localStorage (nothing else is touched). */
function forgetOldVisitorId(win) {
  try {
    if (win.localStorage?.getItem(OLD_VISITOR_STORAGE_KEY) !== null) win.localStorage.removeItem(OLD_VISITOR_STORAGE_KEY);
  } catch {
    // Storage blocked: then nothing was kept either.
  }
}

/**
 * Keeps `counter` connected while the reader is here: from when `group` has
 * settled on the visitor id, paused once the tab has been hidden for
 * `awayAfter` ms (null: never) or while the page is in the back/forward
 * cache (pagehide), resumed when the tab is visible again (pageshow).
 */
function watchPresence(win, doc, counter, group, awayAfter = DEFAULT_AWAY_AFTER, log = console) {
  let ready = group === null;
  let away = false;
  let cached = false;
  let timer = null;
  const sync = () => {
    if (ready && !away && !cached) counter.resume();
    else counter.pause();
  };
  const onVisibility = () => {
    clearTimeout(timer);
    timer = null;
    if (doc.visibilityState === "hidden") {
      if (awayAfter !== null && !away) {
        timer = setTimeout(() => {
          away = true;
          sync();
        }, awayAfter);
      }
    } else {
      away = false;
      sync();
    }
  };
  const onPageHide = () => {
    cached = true;
    sync();
    group?.suspend();
  };
  const onPageShow = (event) => {
    if (!event.persisted) return;
    group?.resume();
    cached = false;
    onVisibility();
    sync();
  };
  doc.addEventListener("visibilitychange", onVisibility);
  win.addEventListener("pagehide", onPageHide);
  win.addEventListener("pageshow", onPageShow);
  group?.ready.then((id) => {
    try {
      counter.setVisitor(id);
    } catch (e) {
      log.error("link-counter: the tabs' visitor id", e);
    }
    ready = true;
    sync();
  });
  onVisibility();
  sync();
  return {
    stop() {
      clearTimeout(timer);
      doc.removeEventListener("visibilitychange", onVisibility);
      win.removeEventListener("pagehide", onPageHide);
      win.removeEventListener("pageshow", onPageShow);
    },
  };
}

/**
 * Calls `changed` (at most once per task) when the URL may have changed
 * without a reload: `history.pushState` / `replaceState`, `popstate`,
 * `hashchange`, and the Navigation API's `currententrychange` where the
 * browser has it.
 */
function watchUrl(win, changed) {
  let href = win.location.href;
  let queued = false;
  let active = true;
  const check = () => {
    if (queued || !active) return;
    queued = true;
    queueMicrotask(() => {
      queued = false;
      if (!active || win.location.href === href) return;
      href = win.location.href;
      changed();
    });
  };
  const history = win.history;
  const wrapped = []; // [name, original, wrapper]
  for (const name of ["pushState", "replaceState"]) {
    const original = history?.[name];
    if (typeof original !== "function") continue;
    const wrapper = function (...args) {
      const result = original.apply(this, args);
      check();
      return result;
    };
    history[name] = wrapper;
    wrapped.push([name, original, wrapper]);
  }
  win.addEventListener("popstate", check);
  win.addEventListener("hashchange", check);
  win.navigation?.addEventListener?.("currententrychange", check);
  return {
    stop() {
      active = false;
      // Unless another script wrapped it after us (then ours stays in its chain, harmless).
      for (const [name, original, wrapper] of wrapped) if (history[name] === wrapper) history[name] = original;
      win.removeEventListener("popstate", check);
      win.removeEventListener("hashchange", check);
      win.navigation?.removeEventListener?.("currententrychange", check);
    },
  };
}

/** The <script> element that loaded this module, if any. */
function ownScript() {
  if (typeof document === "undefined") return null;
  for (const s of document.querySelectorAll("script[src]")) {
    if (s.src === import.meta.url) return s;
  }
  return null;
}

/** A boolean data attribute: present (with no value, or any but "false"/"off") is on. */
function flag(value) {
  return value !== undefined && !/^(false|off)$/i.test(value);
}

/** The `data-away-after` of the script tag, in ms (null: off); the default when absent or bad. */
function awayAfterOf(value) {
  if (value === undefined || value === "") return DEFAULT_AWAY_AFTER;
  const ms = parseAwayAfter(value);
  if (ms !== undefined) return ms;
  console.warn(`link-counter: data-away-after ${JSON.stringify(value)} is not a duration like "90s" or "2m", or "off"; using 1 minute`);
  return DEFAULT_AWAY_AFTER;
}

// Loaded by a script tag (not imported): start the embed, configured by the
// tag's data attributes.
const script = ownScript();
if (script && script.dataset.embed !== "off") {
  const start = () => {
    window.linkCounter = embed({
      page: script.dataset.page || undefined,
      host: script.dataset.host || undefined,
      links: script.dataset.links || undefined,
      count: script.dataset.count || undefined,
      keepIndex: flag(script.dataset.keepIndex),
      awayAfter: awayAfterOf(script.dataset.awayAfter),
      countAutomation: flag(script.dataset.countAutomation),
    });
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start, { once: true });
  else start();
}
