//! Admission control: origin patterns, the client IP behind trusted proxies,
//! per-IP and global connection caps, and the token bucket used for both
//! connection and message rates. Pure logic plus one sharded map; no I/O.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;

// ---------------------------------------------------------------- token bucket

/// A token bucket: `rate` tokens per second, at most `burst` stored.
/// A rate of 0 means unlimited.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    /// Refill per second (0 = unlimited).
    rate: f64,
    /// Capacity.
    burst: f64,
    /// Tokens available at `last`.
    tokens: f64,
    /// Last refill.
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True when the bucket would be full at `now` (nothing to remember).
    fn is_full(&self, now: Instant) -> bool {
        self.rate <= 0.0
            || self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate
                >= self.burst
    }
}

// ---------------------------------------------------------------- origins

/// One entry of `security.allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginPattern {
    /// Required scheme, if the pattern names one.
    scheme: Option<String>,
    /// Exact host, or the suffix (".example.com") for a `*.` pattern.
    host: String,
    /// True for `*.domain` patterns.
    wildcard: bool,
    /// Required port, if the pattern names one.
    port: Option<u16>,
}

/// Splits an origin or pattern into (scheme, host, port).
fn split_origin(s: &str) -> Result<(Option<&str>, &str, Option<u16>), String> {
    let (scheme, rest) = match s.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, s),
    };
    if rest.is_empty() || rest.contains('/') {
        return Err(format!("{s:?} is not an origin (scheme://host[:port])"));
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(r) => {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
            match after {
                "" => (h, None),
                _ => (h, Some(after.strip_prefix(':').unwrap_or(after))),
            }
        }
        None => match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("{s:?} has an invalid port"))?,
        ),
        None => None,
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    Ok((scheme, host, port))
}

impl OriginPattern {
    /// Parses `https://example.com`, `example.com:8080`, `*.example.com`, `https://*.example.com`.
    pub(crate) fn parse(s: &str) -> Result<OriginPattern, String> {
        let (scheme, host, port) = split_origin(s.trim())?;
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(rest) if !rest.is_empty() && !rest.contains('*') => (true, format!(".{rest}")),
            Some(_) => return Err(format!("{s:?}: a wildcard needs a domain after '*.'")),
            None if host.contains('*') => {
                return Err(format!("{s:?}: '*' is only allowed as a leading '*.'"))
            }
            None => (false, host.to_owned()),
        };
        Ok(OriginPattern {
            scheme: scheme.map(str::to_ascii_lowercase),
            host: host.to_ascii_lowercase(),
            wildcard,
            port,
        })
    }

    /// Does the `Origin` header value match?
    pub(crate) fn matches(&self, origin: &str) -> bool {
        let Ok((Some(scheme), host, port)) = split_origin(origin) else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        if self
            .scheme
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case(scheme))
        {
            return false;
        }
        if self.port.is_some() && self.port != port {
            return false;
        }
        if self.wildcard {
            host.ends_with(&self.host) && host.len() > self.host.len()
        } else {
            host == self.host
        }
    }
}

/// The origin policy: an empty list allows any origin.
#[derive(Debug, Clone, Default)]
pub(crate) struct OriginPolicy {
    /// Allowed patterns.
    patterns: Vec<OriginPattern>,
}

impl OriginPolicy {
    /// The policy of `security.allowed_origins` (validated at start-up, so
    /// every entry parses).
    pub(crate) fn new(allowed_origins: &[String]) -> OriginPolicy {
        OriginPolicy {
            patterns: allowed_origins
                .iter()
                .filter_map(|o| OriginPattern::parse(o).ok())
                .collect(),
        }
    }

    /// `None` (no Origin header: a non-browser client) is allowed.
    pub(crate) fn allows(&self, origin: Option<&str>) -> bool {
        match origin {
            _ if self.patterns.is_empty() => true,
            None => true,
            Some(o) => self.patterns.iter().any(|p| p.matches(o)),
        }
    }
}

// ---------------------------------------------------------------- crawlers

/// The crawler filter of `security.bot_user_agents`: a `User-Agent` that
/// contains one of its tokens, ASCII case-insensitive, is a crawler's.
#[derive(Debug, Clone, Default)]
pub(crate) struct BotFilter {
    /// The tokens, ASCII-lowercased once here (validated at start-up).
    tokens: Vec<Vec<u8>>,
}

impl BotFilter {
    /// The filter of `security.bot_user_agents` (empty: nothing is a crawler).
    pub(crate) fn new(tokens: &[String]) -> BotFilter {
        BotFilter {
            tokens: tokens
                .iter()
                .filter(|t| !t.is_empty())
                .map(|t| t.as_bytes().to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether `user_agent` (the header's raw bytes; `None` when absent)
    /// names a crawler. A missing header is not one: non-browser clients
    /// (PartySocket in Node, our tests) need not send it.
    pub(crate) fn is_bot(&self, user_agent: Option<&[u8]>) -> bool {
        let Some(ua) = user_agent else {
            return false;
        };
        if self.tokens.is_empty() {
            return false;
        }
        let ua = ua.to_ascii_lowercase();
        self.tokens
            .iter()
            .any(|t| ua.windows(t.len()).any(|w| w == t.as_slice()))
    }
}

// ---------------------------------------------------------------- client IP

/// Parses one `X-Forwarded-For` / `Forwarded: for=` element into an IP.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    // "[2001:db8::1]:4711" or "192.0.2.1:4711"
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    s.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok())
}

/// The hops a request claims, oldest first: `Forwarded` (RFC 7239) if
/// present, otherwise `X-Forwarded-For`. `None` marks an unparsable hop.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = headers
        .get_all("forwarded")
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .filter_map(|elem| {
                elem.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_forwarded_ip(v))
                })
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(parse_forwarded_ip)
        .collect()
}

/// The client IP: the TCP peer unless it is a trusted proxy, in which case
/// the right-most hop of the forwarding chain that is not itself a trusted
/// proxy. A client can prepend anything it likes to the chain, so only hops
/// added by trusted proxies (the right end) are believed.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded_chain(headers).into_iter().rev() {
        match hop {
            Some(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

// ---------------------------------------------------------------- connection caps

/// Which connection cap an upgrade would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapExceeded {
    /// `limits.max_connections` reached (503).
    Global,
    /// `limits.max_connections_per_ip` reached (429).
    PerIp,
    /// `limits.connections_per_ip_per_second` exceeded (429).
    Rate,
}

impl CapExceeded {
    /// The text a refused upgrade is answered with.
    pub(crate) fn message(self) -> &'static str {
        match self {
            CapExceeded::Global => "server is at its connection limit; retry later",
            CapExceeded::PerIp => "too many concurrent connections from your address",
            CapExceeded::Rate => "too many new connections from your address; slow down",
        }
    }
}

/// Per-IP state.
struct IpEntry {
    /// Open connections of this IP.
    open: usize,
    /// New-connection bucket.
    bucket: TokenBucket,
}

/// Number of independently locked parts of the per-IP map.
const IP_SHARDS: usize = 16;

/// Connection caps shared by all HTTP workers. Each per-IP lock covers one
/// sixteenth of the map and is held for a few instructions.
pub(crate) struct ConnLimiter {
    /// Global cap (0 = none).
    max_total: usize,
    /// Per-IP concurrent cap (0 = none).
    max_per_ip: usize,
    /// Per-IP new-connection rate and burst.
    rate: (f64, f64),
    /// Open connections in total.
    total: AtomicUsize,
    /// Per-IP entries, sharded by IP hash.
    ips: [Mutex<HashMap<IpAddr, IpEntry>>; IP_SHARDS],
}

/// An admitted connection; dropping it releases its slot.
pub(crate) struct Permit {
    /// The limiter to release into.
    limiter: Arc<ConnLimiter>,
    /// The client IP it was admitted for.
    ip: IpAddr,
}

impl ConnLimiter {
    /// Caps of `limits.max_connections`, `limits.max_connections_per_ip`
    /// and `limits.connections_per_ip_per_second` / `_burst` (0 = none).
    pub(crate) fn new(
        max_total: usize,
        max_per_ip: usize,
        rate: f64,
        burst: f64,
    ) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max_total,
            max_per_ip,
            rate: (rate, burst),
            total: AtomicUsize::new(0),
            ips: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        })
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, IpEntry>> {
        let mut h = std::hash::DefaultHasher::new();
        ip.hash(&mut h);
        &self.ips[(h.finish() % IP_SHARDS as u64) as usize]
    }

    /// Admits one more connection from `ip`, or says why not.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, CapExceeded> {
        let total = self.total.fetch_add(1, Ordering::SeqCst) + 1;
        if self.max_total > 0 && total > self.max_total {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(CapExceeded::Global);
        }
        let now = Instant::now();
        // A poisoned lock only means another thread panicked mid-update of
        // plain counters; the map is still usable.
        let mut map = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 4096 {
            map.retain(|_, e| e.open > 0 || !e.bucket.is_full(now));
        }
        let entry = map.entry(ip).or_insert_with(|| IpEntry {
            open: 0,
            bucket: TokenBucket::new(self.rate.0, self.rate.1),
        });
        let exceeded = if self.max_per_ip > 0 && entry.open >= self.max_per_ip {
            Some(CapExceeded::PerIp)
        } else if !entry.bucket.try_take(now) {
            Some(CapExceeded::Rate)
        } else {
            None
        };
        if let Some(r) = exceeded {
            drop(map);
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(r);
        }
        entry.open += 1;
        Ok(Permit {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Permit {
    /// The client IP this connection was admitted for.
    pub(crate) fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut map = self
            .limiter
            .shard(&self.ip)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(&self.ip) {
            e.open = e.open.saturating_sub(1);
            if e.open == 0 && e.bucket.is_full(now) {
                map.remove(&self.ip);
            }
        }
        drop(map);
        self.limiter.total.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    /// The examples of docs/SECURITY.md#origins, row by row.
    #[test]
    fn origin_rules_as_documented() {
        let rows: [(&str, &[&str], &[&str]); 4] = [
            (
                "https://example.com",
                &["https://example.com", "https://example.com:8443"],
                &["http://example.com", "https://www.example.com"],
            ),
            (
                "https://example.com:8443",
                &["https://example.com:8443"],
                &["https://example.com"],
            ),
            (
                "example.com",
                &["https://example.com", "http://example.com:8080"],
                &["https://www.example.com"],
            ),
            (
                "https://*.example.com",
                &["https://www.example.com", "https://a.b.example.com"],
                &["https://example.com", "http://www.example.com"],
            ),
        ];
        for (entry, allows, refuses) in rows {
            let p = OriginPattern::parse(entry).expect("parses");
            for o in allows {
                assert!(p.matches(o), "{entry} should allow {o}");
            }
            for o in refuses {
                assert!(!p.matches(o), "{entry} should refuse {o}");
            }
        }
        let site = OriginPolicy::new(&[
            "https://example.com".to_owned(),
            "https://*.example.com".to_owned(),
        ]);
        assert!(site.allows(Some("https://example.com")));
        assert!(site.allows(Some("https://www.example.com")));
        assert!(!site.allows(Some("null")));
    }

    /// A crawler token matches anywhere in the User-Agent, in any ASCII
    /// case; a browser's, a missing header and an empty list do not match.
    #[test]
    fn bot_filter_matches_tokens_case_insensitively() {
        let f = BotFilter::new(&["Googlebot".into(), "facebookexternalhit".into()]);
        let google = b"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; \
            Googlebot/2.1; +http://www.google.com/bot.html) Chrome/120.0 Safari/537.36";
        assert!(f.is_bot(Some(google)));
        assert!(f.is_bot(Some(b"GOOGLEBOT")));
        assert!(f.is_bot(Some(b"FacebookExternalHit/1.1")));
        let firefox = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
        assert!(!f.is_bot(Some(firefox)));
        assert!(!f.is_bot(Some(b"Google")));
        assert!(!f.is_bot(Some(b"\xff\xfe not ascii")));
        assert!(!f.is_bot(None));
        assert!(!BotFilter::new(&[]).is_bot(Some(google)));
    }

    #[test]
    fn origin_patterns() {
        let p = |s| OriginPattern::parse(s).unwrap();
        assert!(p("https://example.com").matches("https://example.com"));
        assert!(p("https://example.com").matches("https://EXAMPLE.com"));
        assert!(!p("https://example.com").matches("http://example.com"));
        assert!(!p("https://example.com").matches("https://example.com.evil.net"));
        assert!(p("*.example.com").matches("https://a.example.com"));
        assert!(p("*.example.com").matches("http://a.b.example.com:8080"));
        assert!(!p("*.example.com").matches("https://example.com"));
        assert!(!p("*.example.com").matches("https://badexample.com"));
        assert!(!p("https://*.example.com").matches("http://a.example.com"));
        assert!(p("http://localhost:3000").matches("http://localhost:3000"));
        assert!(!p("http://localhost:3000").matches("http://localhost:3001"));
        assert!(!p("https://example.com").matches("null"));
        assert!(OriginPattern::parse("https://ex*.com").is_err());
        assert!(OriginPattern::parse("https://example.com/path").is_err());
        assert!(OriginPattern::parse("*.").is_err());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn client_ip_believes_only_trusted_hops() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Untrusted peer: headers ignored.
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(client_ip(ip("5.6.7.8"), &h, &trusted), ip("5.6.7.8"));
        // Trusted proxy: the right-most untrusted hop; a spoofed left part is ignored.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.2")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        // Forwarded (RFC 7239) wins over X-Forwarded-For.
        let h = headers(&[
            (
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https",
            ),
            ("x-forwarded-for", "9.9.9.9"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("2001:db8::1"));
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, garbage")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
        // No header: the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn token_bucket_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + std::time::Duration::from_millis(100)));
        assert!(TokenBucket::new(0.0, 0.0).try_take(t0));
    }
}
