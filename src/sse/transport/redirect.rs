//! Which redirects are followed, and what a request keeps when one leaves the origin.

use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName};
use url::Url;

use super::display_url;

/// The redirect rules of a request (a request extension; without it no redirect is
/// followed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedirectRules {
    /// Most redirects followed for one request.
    pub max: usize,
    /// Keep every header on a redirect to another origin.
    pub forward_headers: bool,
    /// Headers kept on a redirect to another origin even without `forward_headers` (they
    /// describe the request, not who makes it: `Accept`, `Last-Event-ID`).
    pub keep_across_origins: &'static [HeaderName],
}

/// Why a redirect is not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("too many redirects (more than max_redirects = {max}; a redirect loop?)")]
    TooMany { max: usize },
    #[error("{target} is not an http:// or https:// URL")]
    NotHttp { target: String },
    #[error("redirect from https to http refused (it would drop TLS)")]
    Downgrade,
}

/// Whether a redirect from `from` to `to` may be followed after `followed` others: an error
/// saying why not, else whether it leaves the origin (scheme, host, port).
pub fn check(from: &Url, to: &Url, followed: usize, max: usize) -> Result<bool, RedirectError> {
    // As reqwest's policy counted: the URLs visited so far, the first one included.
    if followed + 1 > max {
        return Err(RedirectError::TooMany { max });
    }
    if !matches!(to.scheme(), "http" | "https") || to.host().is_none() {
        return Err(RedirectError::NotHttp {
            target: display_url(to),
        });
    }
    if from.scheme() == "https" && to.scheme() != "https" {
        return Err(RedirectError::Downgrade);
    }
    Ok(to.scheme() != from.scheme()
        || to.host_str() != from.host_str()
        || to.port_or_known_default() != from.port_or_known_default())
}

/// The headers of a request redirected to another origin: without `forward_headers`, every
/// header but those of `keep_across_origins` is dropped (any configured header may be a
/// credential the operator did not mark), and the credential headers reqwest drops
/// (`Authorization`, `Cookie`, `Cookie2`, `Proxy-Authorization`, `WWW-Authenticate`) are dropped
/// whatever the rules.
pub fn cross_origin_headers(headers: &mut HeaderMap, rules: &RedirectRules) {
    if rules.forward_headers {
        return;
    }
    let drop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !rules.keep_across_origins.contains(name))
        .cloned()
        .collect();
    for name in drop {
        headers.remove(name);
    }
    for name in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, WWW_AUTHENTICATE] {
        headers.remove(name);
    }
    headers.remove("cookie2");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_counted_downgrades_refused_and_other_origins_spotted() {
        let u = |s: &str| Url::parse(s).unwrap();
        let https = u("https://a.example/x");
        assert_eq!(check(&https, &u("https://a.example/y"), 0, 1), Ok(false));
        assert_eq!(
            check(&https, &u("https://a.example:443/y"), 0, 1),
            Ok(false)
        );
        assert_eq!(check(&https, &u("https://b.example/y"), 0, 1), Ok(true));
        assert_eq!(check(&https, &u("https://a.example:8443/"), 0, 1), Ok(true));
        let e = check(&https, &u("http://a.example/y"), 0, 10).unwrap_err();
        assert!(e.to_string().contains("https to http"), "{e}");
        let e = check(&https, &u("https://a.example/y"), 1, 1).unwrap_err();
        assert!(
            e.to_string().contains("too many redirects")
                && e.to_string().contains("max_redirects = 1"),
            "{e}"
        );
        assert!(check(&https, &u("https://a.example/y"), 0, 0).is_err());
        let e = check(&https, &u("ftp://a.example/y"), 0, 10).unwrap_err();
        assert!(e.to_string().contains("not an http"), "{e}");
        // http to https is an upgrade (and another origin: port 80 vs 443).
        assert_eq!(check(&u("http://a.example/"), &https, 0, 1), Ok(true));
    }

    static KEEP: [HeaderName; 2] = [
        http::header::ACCEPT,
        HeaderName::from_static("last-event-id"),
    ];

    #[test]
    fn another_origin_keeps_only_what_describes_the_request() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("accept", "text/event-stream"),
            ("last-event-id", "7"),
            ("x-api-key", "k"),
            ("authorization", "Bearer t"),
            ("cookie2", "c"),
        ] {
            headers.insert(HeaderName::from_static(k), v.parse().unwrap());
        }
        let mut rules = RedirectRules {
            max: 10,
            forward_headers: true,
            keep_across_origins: &KEEP,
        };
        let mut kept = headers.clone();
        cross_origin_headers(&mut kept, &rules);
        assert_eq!(kept.len(), 5);
        rules.forward_headers = false;
        cross_origin_headers(&mut headers, &rules);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept", "last-event-id"]);
    }
}
