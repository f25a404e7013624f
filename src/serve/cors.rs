//! Cross-origin requests (CORS) for `serve`: which web pages may read the streams.
//!
//! A browser lets a page read a response from another origin only when the response names
//! the page's origin in `Access-Control-Allow-Origin`; before a request that sets headers of
//! its own (an EventSource reconnecting with `Last-Event-ID`, or `Authorization`), it asks
//! first with an `OPTIONS` preflight. The rules here:
//! - the allowed origins are exact (`https://dashboard.example.org`, scheme, host and port),
//!   or `*` for any page; none by default, so no other site's page can read a stream;
//! - a request from an origin that is not allowed is refused with 403, before anything is
//!   read from the database (a browser would hide the answer from the page anyway);
//! - every answer to an allowed origin names it and says `Vary: Origin`, so that no cache
//!   hands one origin's answer to another; `Access-Control-Allow-Credentials: true` is added
//!   when `cors_credentials` is on (cookies or HTTP authentication sent by the browser, for a
//!   deployment where a proxy in front of `serve` checks them);
//! - requests without an `Origin` header (same-origin pages, curl, another sse-bridge) are not
//!   cross-origin and are not affected.

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

/// Request headers a page may send (`Access-Control-Allow-Headers`).
const ALLOW_HEADERS: &str = "Authorization, Last-Event-ID, Cache-Control, Accept";

/// How long a browser may reuse a preflight's answer, in seconds.
const MAX_AGE_SECS: &str = "600";

/// The CORS policy of a server.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    /// Allowed origins, as browsers serialize them (`scheme://host[:port]`, lowercase).
    origins: Vec<String>,
    /// `*` was configured: every origin.
    any: bool,
    credentials: bool,
}

/// Checks one configured origin; the error says what a valid one looks like.
pub fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let url = url::Url::parse(origin).map_err(|e| {
        format!("{origin:?} is not an origin ({e}); write it as scheme://host[:port]")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{origin:?}: a page's origin is http:// or https://"
        ));
    }
    let serialized = url.origin().ascii_serialization();
    if serialized != origin {
        return Err(format!(
            "{origin:?} is not written as browsers send it; write {serialized:?} (no path, no \
             trailing slash, lowercase host, no default port)"
        ));
    }
    Ok(())
}

impl Cors {
    /// A policy from configured origins (each checked with [`check_origin`] first) and whether
    /// credentials are allowed. `*` with credentials is refused: browsers refuse it too.
    pub fn new(origins: &[String], credentials: bool) -> Result<Cors, String> {
        for o in origins {
            check_origin(o)?;
        }
        let any = origins.iter().any(|o| o == "*");
        if any && credentials {
            return Err(
                "`*` cannot be used with credentials (browsers refuse it); list the origins".into(),
            );
        }
        Ok(Cors {
            origins: origins.iter().filter(|o| *o != "*").cloned().collect(),
            any,
            credentials,
        })
    }

    /// Whether a request may go on: it has no `Origin`, or an allowed one.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        match headers.get("origin") {
            None => true,
            Some(origin) => self.allows(origin),
        }
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any
            || self
                .origins
                .iter()
                .any(|o| o.as_bytes() == origin.as_bytes())
    }

    /// Adds the CORS headers to `response` for the request's `Origin`, when it is allowed.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response: &mut Response) {
        let h = response.headers_mut();
        if !h.contains_key("vary") {
            h.insert("vary", HeaderValue::from_static("Origin"));
        }
        let Some(origin) = origin.filter(|o| self.allows(o)) else {
            return;
        };
        let allow = if self.any && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        };
        h.insert("access-control-allow-origin", allow);
        if self.credentials {
            h.insert(
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            );
        }
    }

    /// The answer to an `OPTIONS` request: a preflight from an allowed origin for `GET` is
    /// answered 204 with what the page may send; one from another origin, or for another
    /// method, 403; a plain `OPTIONS` (no `Origin`) lists the methods.
    pub fn preflight(&self, request: &HeaderMap) -> Response {
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let h = response.headers_mut();
        h.insert("allow", HeaderValue::from_static("GET, OPTIONS"));
        let Some(origin) = request.get("origin") else {
            return response;
        };
        let method_ok = request
            .get("access-control-request-method")
            .is_none_or(|m| m.as_bytes() == b"GET" || m.as_bytes() == b"HEAD");
        if !self.allows(origin) || !method_ok {
            let mut refused = super::plain(
                StatusCode::FORBIDDEN,
                if method_ok {
                    "this origin may not read from this server (serve.cors_origins)\n".into()
                } else {
                    "only GET is served\n".into()
                },
            );
            refused
                .headers_mut()
                .insert("vary", HeaderValue::from_static("Origin"));
            return refused;
        }
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("GET, OPTIONS"),
        );
        h.insert(
            "access-control-allow-headers",
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            "access-control-max-age",
            HeaderValue::from_static(MAX_AGE_SECS),
        );
        h.insert(
            "vary",
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        self.decorate(request.get("origin"), &mut response);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn get<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers().get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn origins_must_be_written_as_browsers_send_them() {
        assert!(check_origin("https://dashboard.example.org").is_ok());
        assert!(check_origin("http://127.0.0.1:8080").is_ok());
        assert!(check_origin("*").is_ok());
        for (bad, hint) in [
            (
                "https://dashboard.example.org/",
                "write \"https://dashboard.example.org\"",
            ),
            (
                "https://Dashboard.example.org",
                "write \"https://dashboard.example.org\"",
            ),
            ("https://example.org:443", "write \"https://example.org\""),
            ("https://example.org/app", "no path"),
            ("example.org", "scheme://host"),
            ("ftp://example.org", "http:// or https://"),
        ] {
            let err = check_origin(bad).unwrap_err();
            assert!(err.contains(hint), "{bad}: {err}");
        }
        assert!(Cors::new(&["*".into()], true).is_err());
    }

    #[test]
    fn listed_origins_are_named_others_refused() {
        let cors = Cors::new(&["https://a.example".into()], false).unwrap();
        let listed = headers(&[("origin", "https://a.example")]);
        let other = headers(&[("origin", "https://evil.example")]);
        assert!(cors.admits(&listed));
        assert!(!cors.admits(&other));
        assert!(
            cors.admits(&HeaderMap::new()),
            "no Origin: not cross-origin"
        );

        let mut r = Response::new(axum::body::Body::empty());
        cors.decorate(listed.get("origin"), &mut r);
        assert_eq!(
            get(&r, "access-control-allow-origin"),
            Some("https://a.example")
        );
        assert_eq!(get(&r, "vary"), Some("Origin"));
        assert_eq!(get(&r, "access-control-allow-credentials"), None);

        let mut r = Response::new(axum::body::Body::empty());
        cors.decorate(other.get("origin"), &mut r);
        assert_eq!(get(&r, "access-control-allow-origin"), None);
        assert_eq!(get(&r, "vary"), Some("Origin"));

        let none = Cors::default();
        assert!(!none.admits(&listed), "no origin is allowed by default");
    }

    #[test]
    fn preflights() {
        let cors = Cors::new(&["https://a.example".into()], true).unwrap();
        let ok = cors.preflight(&headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "last-event-id"),
        ]));
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            get(&ok, "access-control-allow-origin"),
            Some("https://a.example")
        );
        assert_eq!(get(&ok, "access-control-allow-credentials"), Some("true"));
        assert!(get(&ok, "access-control-allow-headers")
            .unwrap()
            .contains("Last-Event-ID"));
        assert_eq!(get(&ok, "access-control-max-age"), Some("600"));

        let other = cors.preflight(&headers(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "GET"),
        ]));
        assert_eq!(other.status(), StatusCode::FORBIDDEN);
        assert_eq!(get(&other, "access-control-allow-origin"), None);

        let post = cors.preflight(&headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "POST"),
        ]));
        assert_eq!(post.status(), StatusCode::FORBIDDEN);

        let plain = cors.preflight(&HeaderMap::new());
        assert_eq!(plain.status(), StatusCode::NO_CONTENT);
        assert_eq!(get(&plain, "allow"), Some("GET, OPTIONS"));

        let any = Cors::new(&["*".into()], false).unwrap();
        let r = any.preflight(&headers(&[
            ("origin", "https://whoever.example"),
            ("access-control-request-method", "GET"),
        ]));
        assert_eq!(get(&r, "access-control-allow-origin"), Some("*"));
    }
}
