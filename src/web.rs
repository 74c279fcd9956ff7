//! Browser assets compiled into the binary (no runtime file paths): the
//! client library and drop-in embed `web/link-counter.js`, served at
//! `/link-counter.js` with an ETag, and the demo site of the seed (`/` and
//! `/pages/a`..`/pages/d`), served only when `web.demo` is on. The demo's
//! URLs (its script, its links, the redirect from `/`) are relative, so it
//! also works where a proxy mounts the service under a path prefix.

use actix_web::{
    http::{header, StatusCode},
    web, HttpRequest, HttpResponse,
};

use crate::config::WebSettings;

/// The client library and drop-in embed (an ES module, no build step).
pub const LINK_COUNTER_JS: &str = include_str!("../web/link-counter.js");

/// The demo page template: `{{page}}`, `{{title}}` and `{{links}}` are filled in.
const DEMO_TEMPLATE: &str = include_str!("../web/demo/page.html");

/// The seed's link graph: each demo page and the pages it links to.
pub(crate) const DEMO_GRAPH: [(&str, &[&str]); 4] = [
    ("a", &["b", "c", "d"]),
    ("b", &["a", "b", "c"]),
    ("c", &["a", "b", "d"]),
    ("d", &["a"]),
];

/// `Cache-Control` of the script: its URL carries no version, so caches keep
/// it briefly and then revalidate with the ETag (a 304 costs no body).
const SCRIPT_CACHE_CONTROL: &str = "public, max-age=300, must-revalidate";

/// Content hash of the script, the variable part of its ETag.
const LINK_COUNTER_JS_HASH: u64 = crate::hash::fnv1a(LINK_COUNTER_JS.as_bytes());

/// The script's strong ETag: crate version and content hash.
pub(crate) fn script_etag() -> String {
    format!(
        "\"lc-{}-{:016x}\"",
        env!("CARGO_PKG_VERSION"),
        LINK_COUNTER_JS_HASH
    )
}

/// Registers `/link-counter.js` always, and the demo site when `settings.demo`.
pub(crate) fn configure(cfg: &mut web::ServiceConfig, settings: &WebSettings) {
    cfg.route("/link-counter.js", web::get().to(script))
        .route("/link-counter.js", web::head().to(script));
    if settings.demo {
        cfg.route("/", web::get().to(demo_root))
            .route("/pages/{page}", web::get().to(demo_page));
    }
}

/// True when an `If-None-Match` header value matches `etag` (weak comparison,
/// as RFC 9110 asks for `If-None-Match`).
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let ours = bare(etag);
    if_none_match
        .split(',')
        .any(|t| t.trim() == "*" || bare(t) == ours)
}

/// `GET /link-counter.js`: the module, cacheable, loadable from any origin.
async fn script(req: HttpRequest) -> HttpResponse {
    let etag = script_etag();
    let fresh = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|v| v.to_str().ok())
        .any(|v| etag_matches(v, &etag));
    let mut res = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, SCRIPT_CACHE_CONTROL))
        // A module script on another site is fetched in CORS mode.
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if fresh {
        res.finish()
    } else {
        res.content_type("text/javascript; charset=utf-8")
            .body(LINK_COUNTER_JS)
    }
}

/// `GET /` (demo only): the seed's entry page. The `Location` is relative
/// (RFC 9110): behind a proxy's `/presence/` it leads to `/presence/pages/a`.
async fn demo_root() -> HttpResponse {
    HttpResponse::Found()
        .insert_header((header::LOCATION, "pages/a"))
        .finish()
}

/// `GET /pages/{page}` (demo only): one page of the link graph.
async fn demo_page(path: web::Path<String>) -> HttpResponse {
    match render_demo_page(&path) {
        Some(html) => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(html),
        None => HttpResponse::build(StatusCode::NOT_FOUND)
            .content_type("text/plain; charset=utf-8")
            .body(format!(
                "no demo page {:?}; the demo has /pages/a to /pages/d\n",
                path.as_str()
            )),
    }
}

/// The HTML of demo page `page`, or `None` if the graph has no such page.
pub(crate) fn render_demo_page(page: &str) -> Option<String> {
    let (_, links) = DEMO_GRAPH.iter().find(|(p, _)| *p == page)?;
    let items: String = links
        .iter()
        .map(|l| {
            format!(
                "      <li><a href=\"{l}\">Page {up}</a>\
                 <span class=\"link-counter-badge\" data-state=\"unknown\"></span></li>\n",
                up = l.to_ascii_uppercase()
            )
        })
        .collect();
    Some(
        DEMO_TEMPLATE
            .replace("{{page}}", page)
            .replace("{{title}}", &format!("Page {}", page.to_ascii_uppercase()))
            .replace("{{links}}", items.trim_end()),
    )
}

#[cfg(test)]
mod tests {
    use actix_web::{body::to_bytes, test, App};

    use super::*;

    async fn get(demo: bool, path: &str, etag: Option<&str>) -> (StatusCode, HttpResponse) {
        let app =
            test::init_service(App::new().configure(|cfg| configure(cfg, &WebSettings { demo })))
                .await;
        let mut req = test::TestRequest::get().uri(path);
        if let Some(e) = etag {
            req = req.insert_header((header::IF_NONE_MATCH, e));
        }
        let res = test::call_service(&app, req.to_request()).await;
        (res.status(), res.into_parts().1.map_into_boxed_body())
    }

    fn hdr(res: &HttpResponse, name: header::HeaderName) -> String {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    async fn body(res: HttpResponse) -> String {
        let bytes = to_bytes(res.into_body()).await.unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The script is served with an ETag, a cache policy and CORS, and a
    /// matching `If-None-Match` (strong, weak, in a list or `*`) gets a 304.
    #[actix_web::test]
    async fn script_is_cacheable_and_revalidates() {
        let (status, res) = get(false, "/link-counter.js", None).await;
        assert_eq!(status, StatusCode::OK);
        let etag = hdr(&res, header::ETAG);
        assert_eq!(etag, script_etag());
        assert!(hdr(&res, header::CONTENT_TYPE).starts_with("text/javascript"));
        assert!(hdr(&res, header::CACHE_CONTROL).contains("max-age"));
        assert_eq!(hdr(&res, header::ACCESS_CONTROL_ALLOW_ORIGIN), "*");
        assert_eq!(body(res).await, LINK_COUNTER_JS);

        for inm in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            "*".into(),
        ] {
            let (status, res) = get(false, "/link-counter.js", Some(&inm)).await;
            assert_eq!(status, StatusCode::NOT_MODIFIED, "{inm}");
            assert_eq!(hdr(&res, header::ETAG), etag);
            assert!(body(res).await.is_empty());
        }
        let (status, _) = get(false, "/link-counter.js", Some("\"stale\"")).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// With `demo` on, `/` redirects to `pages/a` and each page of the
    /// seed's graph links exactly its neighbours, through the embed; every
    /// URL is relative, so a path prefix in front of the service is kept.
    #[actix_web::test]
    async fn demo_pages_follow_the_seed_graph() {
        let (status, res) = get(true, "/", None).await;
        assert_eq!(status, StatusCode::FOUND);
        assert_eq!(hdr(&res, header::LOCATION), "pages/a");
        for (page, links) in DEMO_GRAPH {
            let (status, res) = get(true, &format!("/pages/{page}"), None).await;
            assert_eq!(status, StatusCode::OK);
            let html = body(res).await;
            assert!(html.contains(r#"<script type="module" src="../link-counter.js""#));
            assert!(
                !html.contains("src=\"/") && !html.contains("href=\"/"),
                "no root-relative URL in {page}"
            );
            let hrefs: Vec<&str> = html
                .split("<a href=\"")
                .skip(1)
                .filter_map(|s| s.split('"').next())
                .collect();
            assert_eq!(hrefs, links, "links of {page}");
            assert!(!html.contains("{{"), "template fully filled");
        }
        let (status, _) = get(true, "/pages/e", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// With `demo` off the demo routes do not exist; the script still does.
    #[actix_web::test]
    async fn demo_off_serves_only_the_script() {
        for path in ["/", "/pages/a"] {
            let (status, _) = get(false, path, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
        let (status, _) = get(false, "/link-counter.js", None).await;
        assert_eq!(status, StatusCode::OK);
    }
}
