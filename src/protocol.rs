//! Wire types of `docs/PROTOCOL.md` (v1), the HTTP API's bodies, and the
//! page-id rules. Nothing else in the crate builds or parses protocol JSON.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

/// A page id that passed the page-id rules ([`validate_page_id`]: 1..=256
/// bytes of UTF-8, no control characters, no `/`), or the reserved
/// [`PageId::site`]. Its only constructors check: [`PageId::parse`] (an id
/// already decoded: a `subscribe`'s link, a stored record, Redis),
/// [`PageId::decode`] (a URL path segment or query value), deserializing
/// (which parses). A clone is a reference count; it compares, hashes and
/// borrows as its text, so a `HashMap<PageId, _>` is read with a `&str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(Arc<str>);

impl PageId {
    /// An already-decoded id, checked by the page-id rules.
    pub fn parse(id: &str) -> Result<PageId, PageIdError> {
        validate_page_id(id)?;
        Ok(PageId(Arc::from(id)))
    }

    /// A followed link as a node shares it (in cluster mode, read back
    /// from Redis): a page id by the rules, or the site's link (empty).
    pub(crate) fn parse_link(id: &str) -> Result<PageId, PageIdError> {
        if id == SITE_LINK {
            return Ok(PageId::site());
        }
        PageId::parse(id)
    }

    /// A raw URL path segment (or query value), percent-decoded exactly
    /// once and checked.
    pub(crate) fn decode(raw: &str) -> Result<PageId, PageIdError> {
        // A malformed escape ("%G1", a lone "%") is an error, not a literal '%'.
        let bytes = raw.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'%'
                && !(i + 2 < bytes.len()
                    && bytes[i + 1].is_ascii_hexdigit()
                    && bytes[i + 2].is_ascii_hexdigit())
            {
                return Err(PageIdError::Encoding);
            }
        }
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PageIdError::Encoding)?;
        PageId::parse(&decoded)
    }

    /// The link a `"site": true` subscribe follows ([`SITE_LINK`]): the
    /// whole site's figure, the one id no rule-abiding client can name.
    pub(crate) fn site() -> PageId {
        static SITE: std::sync::LazyLock<PageId> =
            std::sync::LazyLock::new(|| PageId(Arc::from(SITE_LINK)));
        SITE.clone()
    }

    /// True for the site figure's link.
    pub(crate) fn is_site(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for PageId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for PageId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for PageId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// As its text (`"id"`), like the `&str` it replaces in logs and panics.
impl std::fmt::Debug for PageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::str::FromStr for PageId {
    type Err = PageIdError;
    fn from_str(id: &str) -> Result<PageId, PageIdError> {
        PageId::parse(id)
    }
}

impl Serialize for PageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Parses by the page-id rules: a string that breaks them is an error, so
/// the site's reserved link never comes out of input.
impl<'de> Deserialize<'de> for PageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PageId, D::Error> {
        let id = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PageId::parse(&id).map_err(serde::de::Error::custom)
    }
}

/// A page's two presence figures: its open connections, and the distinct
/// visitors among them (a connection without a visitor id is its own
/// visitor, so `visitors <= connections`). Node-local or cluster-wide,
/// depending on who holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tally {
    /// Open connections.
    pub connections: u64,
    /// Distinct visitor ids among them.
    pub visitors: u64,
}

impl Tally {
    /// No connection.
    pub(crate) const ZERO: Tally = Tally {
        connections: 0,
        visitors: 0,
    };

    /// Both figures summed (saturating).
    pub(crate) fn plus(self, other: Tally) -> Tally {
        Tally {
            connections: self.connections.saturating_add(other.connections),
            visitors: self.visitors.saturating_add(other.visitors),
        }
    }

    /// True when no connection is counted.
    pub(crate) fn is_zero(self) -> bool {
        self.connections == 0
    }
}

/// Longest page id in bytes.
pub(crate) const MAX_PAGE_ID_BYTES: usize = 256;

/// Close codes of the protocol.
pub(crate) mod close {
    /// Normal close.
    pub(crate) const NORMAL: u16 = 1000;
    /// Server shutting down; clients reconnect with backoff.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// Binary frame received.
    pub(crate) const UNSUPPORTED: u16 = 1003;
    /// WebSocket protocol violation (malformed frames).
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not valid UTF-8.
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation (origin, abuse, caps).
    pub(crate) const POLICY: u16 = 1008;
    /// Message larger than `max_message_bytes`.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// Try again later: a capacity cap with nothing left to evict, or a
    /// socket that took no bytes for `client_timeout`; reconnect with backoff.
    pub(crate) const TRY_AGAIN_LATER: u16 = 1013;
}

/// The `code` of an `error` message (docs/PROTOCOL.md) and of the HTTP
/// API's error bodies: the only place they are spelled ([`ErrorCode::as_str`],
/// which is also what it serializes to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ErrorCode {
    /// Not JSON, not an object, or `links` missing or not an array of strings.
    InvalidJson,
    /// A message `type` the server does not know.
    UnknownType,
    /// A page id that breaks the page-id rules.
    InvalidPageId,
    /// More than `max_links_per_subscribe` ids.
    TooManyLinks,
    /// Over `limits.messages_per_second`: the message is ignored.
    RateLimited,
    /// A cap is reached, or the counter did not answer.
    Overloaded,
    /// HTTP API: a `limit` that is not an integer.
    InvalidLimit,
    /// HTTP API: `admin.token` is set and the request does not carry it.
    Unauthorized,
    /// A `?visitor=` id that breaks the rules: ignored (the connection is its
    /// own visitor); the connection stays open.
    InvalidVisitor,
    /// HTTP API: a query parameter with a value it does not take.
    InvalidParameter,
    /// HTTP API: a page the server has no record of (its history).
    UnknownPage,
}

impl ErrorCode {
    /// Every code.
    #[cfg(test)]
    const ALL: [ErrorCode; 11] = [
        ErrorCode::InvalidJson,
        ErrorCode::UnknownType,
        ErrorCode::InvalidPageId,
        ErrorCode::TooManyLinks,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::InvalidLimit,
        ErrorCode::Unauthorized,
        ErrorCode::InvalidVisitor,
        ErrorCode::InvalidParameter,
        ErrorCode::UnknownPage,
    ];

    /// The code as the wire spells it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidPageId => "invalid_page_id",
            ErrorCode::TooManyLinks => "too_many_links",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::InvalidLimit => "invalid_limit",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InvalidVisitor => "invalid_visitor",
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::UnknownPage => "unknown_page",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why a page id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageIdError {
    #[error("page id is empty")]
    Empty,
    #[error("page id is longer than {MAX_PAGE_ID_BYTES} bytes")]
    TooLong,
    #[error("page id contains a control character")]
    Control,
    #[error("page id contains '/'")]
    Slash,
    #[error("page id is not valid percent-encoded UTF-8")]
    Encoding,
}

/// Checks an already-decoded id.
pub(crate) fn validate_page_id(id: &str) -> Result<(), PageIdError> {
    if id.is_empty() {
        return Err(PageIdError::Empty);
    }
    if id.len() > MAX_PAGE_ID_BYTES {
        return Err(PageIdError::TooLong);
    }
    if id.contains('/') {
        return Err(PageIdError::Slash);
    }
    if id.chars().any(char::is_control) {
        return Err(PageIdError::Control);
    }
    Ok(())
}

/// The link a `"site": true` subscribe follows: the whole site's figure.
/// Not a valid page id (ids are never empty), so no page can take it; an
/// `update` shows its value as `"site"`, never among the pages.
pub(crate) const SITE_LINK: &str = "";

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientMessage {
    /// Replace this connection's link set (duplicates removed, order kept);
    /// with `visitors`, its updates also carry the `visitors` map; with
    /// `site`, the `site` figure (the link [`SITE_LINK`] is followed).
    Subscribe {
        links: Vec<PageId>,
        visitors: bool,
        site: bool,
    },
}

/// An `error` reply: its code and human text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtocolError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl ProtocolError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    /// The JSON text of this error message.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(&ServerError {
            kind: "error",
            code: self.code,
            message: &self.message,
        })
        .unwrap_or_else(|_| String::from(r#"{"type":"error","code":"internal","message":""}"#))
    }
}

#[derive(Serialize)]
struct ServerError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: ErrorCode,
    message: &'a str,
}

/// Parses and validates one text frame.
pub(crate) fn parse_client_message(
    text: &str,
    max_links: usize,
) -> Result<ClientMessage, ProtocolError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("message is not valid JSON: {e}"),
        )
    })?;
    let obj = value.as_object().ok_or_else(|| {
        ProtocolError::new(ErrorCode::InvalidJson, "message must be a JSON object")
    })?;
    match message_type(obj)? {
        "subscribe" => parse_subscribe(obj, max_links),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!("unknown message type {:?}", truncate(other)),
        )),
    }
}

/// A client message's `"type"`.
fn message_type(obj: &serde_json::Map<String, serde_json::Value>) -> Result<&str, ProtocolError> {
    match obj.get("type") {
        Some(serde_json::Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            "\"type\" must be a string",
        )),
        None => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            "message has no \"type\"",
        )),
    }
}

/// The fields of a `subscribe`: `links` (required), `visitors` and `site`.
fn parse_subscribe(
    obj: &serde_json::Map<String, serde_json::Value>,
    max_links: usize,
) -> Result<ClientMessage, ProtocolError> {
    let links = match obj.get("links") {
        Some(serde_json::Value::Array(a)) => a,
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidJson,
                "\"links\" must be an array of strings",
            ))
        }
        None => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidJson,
                "subscribe needs \"links\"",
            ))
        }
    };
    let visitors = optional_flag(obj, "visitors")?;
    let site = optional_flag(obj, "site")?;
    Ok(ClientMessage::Subscribe {
        links: subscribe_links(links, max_links)?,
        visitors,
        site,
    })
}

/// An optional boolean field of a message (absent = false).
fn optional_flag(
    obj: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<bool, ProtocolError> {
    match obj.get(name) {
        None | Some(serde_json::Value::Bool(false)) => Ok(false),
        Some(serde_json::Value::Bool(true)) => Ok(true),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("\"{name}\" must be true or false"),
        )),
    }
}

/// A `subscribe`'s `links`: valid page ids, duplicates removed (order kept),
/// at most `max_links` of them.
fn subscribe_links(
    links: &[serde_json::Value],
    max_links: usize,
) -> Result<Vec<PageId>, ProtocolError> {
    let mut out: Vec<PageId> = Vec::with_capacity(links.len().min(max_links));
    let mut seen = std::collections::HashSet::with_capacity(links.len().min(max_links));
    for link in links {
        let s = link.as_str().ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::InvalidJson,
                "\"links\" must be an array of strings",
            )
        })?;
        if seen.insert(s) {
            let id = PageId::parse(s).map_err(|e| {
                ProtocolError::new(
                    ErrorCode::InvalidPageId,
                    format!("link {:?}: {e}", truncate(s)),
                )
            })?;
            out.push(id);
            if out.len() > max_links {
                return Err(ProtocolError::new(
                    ErrorCode::TooManyLinks,
                    format!("at most {max_links} links per subscribe"),
                ));
            }
        }
    }
    Ok(out)
}

/// The subscription of an event stream, from its query string: `links=`
/// (ids separated by commas, each percent-encoded as in a path segment, so
/// a comma inside an id is `%2C` and `+` is a plus sign),
/// `visitors=true|false` and `site=true|false`; other keys are ignored. The
/// same `subscribe` a WebSocket client sends (duplicates removed, order
/// kept, at most `max_links`), or the error it would get. `None`: no `links`
/// key and no `site=true` (the stream only counts as a viewer); `links=`
/// with nothing subscribes to nothing.
pub(crate) fn parse_stream_query(
    query: &str,
    max_links: usize,
) -> Result<Option<ClientMessage>, ProtocolError> {
    let flag = |name: &str, value: &str| match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ProtocolError::new(
            ErrorCode::InvalidParameter,
            format!("{name} must be true or false"),
        )),
    };
    let mut raw_links = None;
    let mut visitors = false;
    let mut site = false;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "links" => raw_links = Some(value),
            "visitors" => visitors = flag(key, value)?,
            "site" => site = flag(key, value)?,
            _ => {}
        }
    }
    let raw = match raw_links {
        Some(raw) => raw,
        None if site => "",
        None => return Ok(None),
    };
    let mut links: Vec<PageId> = Vec::new();
    for part in raw.split(',').filter(|p| !p.is_empty()) {
        let id = PageId::decode(part).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidPageId,
                format!("link {:?}: {e}", truncate(part)),
            )
        })?;
        if !links.contains(&id) {
            links.push(id);
            if links.len() > max_links {
                return Err(ProtocolError::new(
                    ErrorCode::TooManyLinks,
                    format!("at most {max_links} links per subscribe"),
                ));
            }
        }
    }
    Ok(Some(ClientMessage::Subscribe {
        links,
        visitors,
        site,
    }))
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Serializes an `update` of the given values: `{"type":"update","connections":{...}}`,
/// and with `visitors` also `"visitors":{...}` (the same ids), each map sorted by id.
/// The value of [`SITE_LINK`], when given, is `"site": N` (its distinct visitors).
pub fn update_json<'a>(
    values: impl IntoIterator<Item = (&'a str, Tally)>,
    visitors: bool,
) -> String {
    #[derive(Serialize)]
    struct Update<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        connections: BTreeMap<&'a str, u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        visitors: Option<BTreeMap<&'a str, u64>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        site: Option<u64>,
    }
    let mut connections = BTreeMap::new();
    let mut distinct = visitors.then(BTreeMap::new);
    let mut site = None;
    for (id, t) in values {
        if id == SITE_LINK {
            site = Some(t.visitors);
            continue;
        }
        connections.insert(id, t.connections);
        if let Some(d) = &mut distinct {
            d.insert(id, t.visitors);
        }
    }
    let update = Update {
        kind: "update",
        connections,
        visitors: distinct,
        site,
    };
    // Serializing maps of strings to integers cannot fail.
    serde_json::to_string(&update).expect("maps of strings to integers serialize")
}

/// Body of `GET /api/v1/pages/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PageInfo {
    pub(crate) id: String,
    pub(crate) connections: u64,
    /// Distinct visitors among the connections (an extension of PROTOCOL.md's shape).
    #[serde(default)]
    pub(crate) visitors: u64,
    pub(crate) peak_connections: u64,
    pub(crate) peak_at: Option<String>,
    /// Highest distinct-visitor figure seen (an extension of PROTOCOL.md's shape).
    #[serde(default)]
    pub(crate) peak_visitors: u64,
    pub(crate) total_connections: u64,
    pub(crate) last_active: Option<String>,
    /// The pages this page's viewers follow, from its stored room record
    /// (an extension of PROTOCOL.md's shape).
    #[serde(default)]
    pub(crate) links: Vec<String>,
}

/// Body of `GET /api/v1/pages/{id}/history` and `GET /api/v1/site/history`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct HistoryBody {
    /// The page id; `null` for the whole site.
    pub(crate) id: Option<String>,
    /// The range asked for: `48h` (per-minute peaks) or `90d` (per-hour).
    pub(crate) range: String,
    /// Length of one point's slot in seconds (60 or 3600).
    pub(crate) step_seconds: u64,
    /// The window: the first slot's start and now (RFC 3339).
    pub(crate) from: String,
    pub(crate) to: String,
    /// The slots when someone was there, oldest first (absent slots had no
    /// one); the last may be the slot in progress.
    pub(crate) points: Vec<HistoryPoint>,
}

/// One slot of a [`HistoryBody`]: the peaks of its two figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct HistoryPoint {
    /// The slot's start (RFC 3339).
    pub(crate) time: String,
    /// Most distinct visitors at once during the slot.
    pub(crate) visitors: u64,
    /// Most connections at once during the slot.
    pub(crate) connections: u64,
}

/// Body of `GET /api/v1/counts?…&visitors=1`: both figures of each id
/// (without `visitors`, the body is the `connections` map alone).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct CountsBody<'a> {
    pub(crate) connections: BTreeMap<&'a str, u64>,
    pub(crate) visitors: BTreeMap<&'a str, u64>,
}

/// Body of `/api/v1/origin`: whether the request's `Origin` passes the
/// upgrade's origin check, and the setting that decides it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct OriginCheckBody<'a> {
    /// The request's `Origin` header (`null` when it has none).
    pub(crate) origin: Option<&'a str>,
    pub(crate) allowed: bool,
    /// The setting to change (`security.allowed_origins`).
    pub(crate) setting: &'static str,
}

/// Body of `/readyz`: the status, and why when not ready.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct ReadinessBody<'a> {
    pub(crate) status: Readiness,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'a str>,
}

/// The `status` of a [`ReadinessBody`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Readiness {
    /// Serving (200).
    Ready,
    /// Not serving: shutting down, storage unusable, counter rebuilding (503).
    Unavailable,
    /// Serving local counts while Redis is unreachable (503).
    Degraded,
}

/// Body of `GET /api/v1/stats`: totals of this server.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct StatsBody {
    /// Open connections (WebSocket sessions and event streams).
    pub(crate) connections: usize,
    /// Distinct visitors among them.
    pub(crate) visitors: u64,
    pub(crate) connections_opened_total: u64,
    pub(crate) rooms: usize,
    pub(crate) pages: usize,
    pub(crate) live_pages: usize,
    pub(crate) subscriptions: usize,
    pub(crate) uptime_seconds: f64,
}

/// Body of `GET /api/v1/history`: the samples of the last minutes, oldest
/// first, with the server's clock.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct LoadHistoryBody {
    pub(crate) interval_seconds: u64,
    pub(crate) window_seconds: u64,
    pub(crate) max_samples: usize,
    /// The server's clock (ms since the Unix epoch), to place the samples.
    pub(crate) now_ms: u64,
    pub(crate) samples: Vec<LoadSample>,
}

/// One sample of a [`LoadHistoryBody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct LoadSample {
    /// When it was taken (ms since the Unix epoch).
    pub(crate) time_ms: u64,
    /// Open WebSocket connections then.
    pub(crate) connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ids_are_decoded_once_and_checked() {
        assert_eq!(&*PageId::decode("hello%20world").unwrap(), "hello world");
        assert_eq!(&*PageId::decode("a%2525").unwrap(), "a%25");
        assert_eq!(PageId::decode("a%2Fb"), Err(PageIdError::Slash));
        assert_eq!(PageId::decode("%0A"), Err(PageIdError::Control));
        assert_eq!(PageId::decode("%ZZ"), Err(PageIdError::Encoding));
        assert_eq!(PageId::decode("abc%"), Err(PageIdError::Encoding));
        assert_eq!(PageId::decode("%FF"), Err(PageIdError::Encoding));
        assert_eq!(PageId::decode(""), Err(PageIdError::Empty));
        assert_eq!(PageId::decode(&"x".repeat(257)), Err(PageIdError::TooLong));
        assert!(PageId::decode(&"x".repeat(256)).is_ok());
    }

    /// Every way in checks the rules; only `site()` (and a shared link)
    /// makes the empty id; the id reads, hashes and serializes as its text.
    #[test]
    fn page_ids_come_only_through_the_rules() {
        assert_eq!(PageId::parse(""), Err(PageIdError::Empty));
        assert_eq!(PageId::parse("a/b"), Err(PageIdError::Slash));
        assert_eq!("a\u{7}".parse::<PageId>(), Err(PageIdError::Control));
        let id = PageId::parse("a b").unwrap();
        assert!(!id.is_site());
        assert_eq!((&*id, id.to_string()), ("a b", "a b".to_string()));
        assert_eq!(format!("{id:?}"), r#""a b""#);
        let site = PageId::site();
        assert!(site.is_site() && &*site == SITE_LINK);
        assert_eq!(PageId::parse_link(""), Ok(PageId::site()));
        assert_eq!(PageId::parse_link("a b"), Ok(id.clone()));
        assert_eq!(PageId::parse_link("a/b"), Err(PageIdError::Slash));
        let map = std::collections::HashMap::from([(id.clone(), 1)]);
        assert_eq!(map.get("a b"), Some(&1));
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""a b""#);
        assert_eq!(serde_json::from_str::<PageId>(r#""a b""#).unwrap(), id);
        for bad in [r#""""#, r#""a/b""#, r#""\n""#, "1"] {
            assert!(serde_json::from_str::<PageId>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_stream_query_subscribes_like_a_subscribe_message() {
        let sub = |links: &[&str], visitors, site| {
            Ok(Some(ClientMessage::Subscribe {
                links: links.iter().map(|l| PageId::parse(l).unwrap()).collect(),
                visitors,
                site,
            }))
        };
        assert_eq!(
            parse_stream_query("visitor=x&links=b,a%2Cc,,b,d+e&visitors=true", 3),
            sub(&["b", "a,c", "d+e"], true, false)
        );
        assert_eq!(parse_stream_query("links=", 3), sub(&[], false, false));
        assert_eq!(parse_stream_query("site=true", 3), sub(&[], false, true));
        assert_eq!(
            parse_stream_query("links=a&site=true", 3),
            sub(&["a"], false, true)
        );
        assert_eq!(parse_stream_query("site=false", 3), Ok(None));
        assert_eq!(parse_stream_query("visitor=x", 3), Ok(None));
        assert_eq!(parse_stream_query("", 3), Ok(None));
        for (query, code) in [
            ("links=a,b,c,d", ErrorCode::TooManyLinks),
            ("links=a%2Fb", ErrorCode::InvalidPageId),
            ("links=%ZZ", ErrorCode::InvalidPageId),
            ("links=a&visitors=yes", ErrorCode::InvalidParameter),
            ("links=a&site=1", ErrorCode::InvalidParameter),
        ] {
            let e = parse_stream_query(query, 3).err();
            assert_eq!(e.map(|e| e.code), Some(code), "{query}");
        }
    }

    /// The codes keep their wire spelling (docs/PROTOCOL.md), serialized
    /// as the plain string in an `error` message.
    #[test]
    fn error_codes_serialize_to_their_wire_spelling() {
        let spelled: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            spelled,
            [
                "invalid_json",
                "unknown_type",
                "invalid_page_id",
                "too_many_links",
                "rate_limited",
                "overloaded",
                "invalid_limit",
                "unauthorized",
                "invalid_visitor",
                "invalid_parameter",
                "unknown_page",
            ]
        );
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{code}\""));
        }
        assert_eq!(
            ProtocolError::new(ErrorCode::RateLimited, "slow down").to_json(),
            r#"{"type":"error","code":"rate_limited","message":"slow down"}"#
        );
    }

    #[test]
    fn subscribe_is_parsed_and_deduplicated() {
        let m = parse_client_message(r#"{"type":"subscribe","links":["b","c","b"]}"#, 256).unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe {
                links: vec![PageId::parse("b").unwrap(), PageId::parse("c").unwrap()],
                visitors: false,
                site: false,
            }
        );
        let site = |t: &str| match parse_client_message(t, 256) {
            Ok(ClientMessage::Subscribe { site, .. }) => Ok(site),
            Err(e) => Err(e.code),
        };
        assert_eq!(
            site(r#"{"type":"subscribe","links":[],"site":true}"#),
            Ok(true)
        );
        assert_eq!(
            site(r#"{"type":"subscribe","links":[],"site":false}"#),
            Ok(false)
        );
        assert_eq!(
            site(r#"{"type":"subscribe","links":[],"site":1}"#),
            Err(ErrorCode::InvalidJson)
        );
        // The site link cannot be asked for as a page.
        assert_eq!(
            site(r#"{"type":"subscribe","links":[""]}"#),
            Err(ErrorCode::InvalidPageId)
        );
        let flagged = |t: &str| match parse_client_message(t, 256) {
            Ok(ClientMessage::Subscribe { visitors, .. }) => Ok(visitors),
            Err(e) => Err(e.code.as_str()),
        };
        assert_eq!(
            flagged(r#"{"type":"subscribe","links":[],"visitors":true}"#),
            Ok(true)
        );
        assert_eq!(
            flagged(r#"{"type":"subscribe","links":[],"visitors":false}"#),
            Ok(false)
        );
        assert_eq!(
            flagged(r#"{"type":"subscribe","links":[],"visitors":1}"#),
            Err("invalid_json")
        );
        assert_eq!(
            flagged(r#"{"type":"subscribe","links":[],"visitors":"yes"}"#),
            Err("invalid_json")
        );
        let codes = |t: &str| parse_client_message(t, 2).unwrap_err().code.as_str();
        assert_eq!(codes("nope"), "invalid_json");
        assert_eq!(codes("[1]"), "invalid_json");
        assert_eq!(codes(r#"{"links":[]}"#), "unknown_type");
        assert_eq!(codes(r#"{"type":"hello"}"#), "unknown_type");
        assert_eq!(codes(r#"{"type":"subscribe"}"#), "invalid_json");
        assert_eq!(codes(r#"{"type":"subscribe","links":"a"}"#), "invalid_json");
        assert_eq!(codes(r#"{"type":"subscribe","links":[1]}"#), "invalid_json");
        assert_eq!(
            codes(r#"{"type":"subscribe","links":[""]}"#),
            "invalid_page_id"
        );
        assert_eq!(
            codes(r#"{"type":"subscribe","links":["a/b"]}"#),
            "invalid_page_id"
        );
        assert_eq!(
            codes(r#"{"type":"subscribe","links":["a","b","c"]}"#),
            "too_many_links"
        );
        // Duplicates do not count against the cap.
        assert!(parse_client_message(r#"{"type":"subscribe","links":["a","b","a"]}"#, 2).is_ok());
    }

    #[test]
    fn update_is_sorted_json() {
        let t = |connections, visitors| Tally {
            connections,
            visitors,
        };
        assert_eq!(
            update_json([("c", t(0, 0)), ("b", t(3, 2))], false),
            r#"{"type":"update","connections":{"b":3,"c":0}}"#
        );
        assert_eq!(
            update_json([("c", t(0, 0)), ("b", t(3, 2))], true),
            r#"{"type":"update","connections":{"b":3,"c":0},"visitors":{"b":2,"c":0}}"#
        );
        assert_eq!(
            update_json([(SITE_LINK, t(9, 7)), ("b", t(3, 2))], false),
            r#"{"type":"update","connections":{"b":3},"site":7}"#
        );
        assert_eq!(
            update_json([(SITE_LINK, t(9, 7))], true),
            r#"{"type":"update","connections":{},"visitors":{},"site":7}"#
        );
    }

    mod fuzz {
        //! Parsing arbitrary input never panics and never allocates beyond
        //! what the input itself holds (bounded by `max_message_bytes`).
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_text_never_panics(text in any::<String>(), max in 0usize..300) {
                let _ = parse_client_message(&text, max);
            }

            #[test]
            fn arbitrary_bytes_as_utf8_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let text = String::from_utf8_lossy(&bytes);
                let _ = parse_client_message(&text, 256);
                let _ = PageId::decode(&text);
            }

            #[test]
            fn json_shaped_input_is_answered(
                kind in prop_oneof![Just("subscribe".to_string()), any::<String>()],
                links in proptest::collection::vec(any::<String>(), 0..40),
                max in 1usize..30,
            ) {
                let text = serde_json::json!({"type": kind, "links": links}).to_string();
                match parse_client_message(&text, max) {
                    Ok(ClientMessage::Subscribe { links: got, .. }) => {
                        prop_assert!(got.len() <= max);
                        for l in &got {
                            prop_assert!(validate_page_id(l).is_ok());
                        }
                    }
                    Err(e) => prop_assert!(!e.message.is_empty()),
                }
            }

            #[test]
            fn url_segments_decode_or_refuse(raw in "[%0-9A-Fa-f/a-z\\x00-\\x7f]{0,300}") {
                if let Ok(id) = PageId::decode(&raw) {
                    prop_assert!(validate_page_id(&id).is_ok());
                }
            }
        }

        #[test]
        fn huge_link_lists_are_capped_without_huge_allocations() {
            // 100k one-byte links in ~400 KB of JSON: the result holds at most
            // max+1 entries before the cap error, whatever the input length.
            let links: Vec<String> = (0..100_000).map(|i| format!("{}", i % 10)).collect();
            let text = serde_json::json!({"type": "subscribe", "links": links}).to_string();
            let ok = parse_client_message(&text, 256).unwrap();
            assert!(matches!(ok, ClientMessage::Subscribe { ref links, .. } if links.len() == 10));
            let distinct: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
            let text = serde_json::json!({"type": "subscribe", "links": distinct}).to_string();
            assert_eq!(
                parse_client_message(&text, 256).unwrap_err().code.as_str(),
                "too_many_links"
            );
        }
    }
}
