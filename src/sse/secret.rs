//! Credentials: held in a type that never shows its value, and scrubbed by value from every
//! text the bridge shows (logs, error messages, the feed's status, `/feeds`, `status`). A
//! server may echo a credential back (in a Content-Type, a redirect target, a reason), and a
//! library may quote one in an error: so text is scrubbed of every known secret value before it
//! is stored or logged, not only where the bridge itself formats a secret. See
//! ARCHITECTURE.md ("Hostile input and bounded resources").

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};

use base64::Engine as _;

use super::options::ClientOptions;

/// What replaces a secret value in text.
pub const REDACTED: &str = "[redacted]";

/// Values shorter than this (in bytes) are not scrubbed from text: replacing every `ab` or
/// `123` in a message would garble it while protecting nothing that could not be guessed.
/// They are still sent, and never formatted on purpose.
pub const MIN_SECRET_LEN: usize = 4;

/// Request headers whose values are secret whatever the feed's `secret_headers` say
/// (lower case).
pub const SECRET_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
];

/// A credential. `Debug` and `Display` show [`REDACTED`]; the value is reached only through
/// [`Secret::expose`], where it is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into().into_boxed_str())
    }

    /// The value, to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({REDACTED})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Whether header `name` is secret for a feed that lists `extra` in `secret_headers`.
pub fn is_secret_header(name: &str, extra: &[String]) -> bool {
    SECRET_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
        || extra.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// A set of secret values to scrub from text. `Debug` shows how many, never which.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Redactor {
    /// Longest first, so that a value containing another is replaced whole.
    values: Vec<Secret>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} values)", self.values.len())
    }
}

impl Redactor {
    /// The secrets of a client known from its options: the URL's userinfo (the password,
    /// `user:password` and its base64 `Basic` form), the values of secret headers (whole, and
    /// the credential after an auth scheme such as `Bearer `), and the bearer token as the
    /// environment or the file holds it now (a token read later is added by the connector).
    pub fn for_client(feed: &ClientOptions) -> Redactor {
        let mut r = Redactor::default();
        if let Ok(url) = url::Url::parse(feed.url.expose()) {
            r.add_userinfo(&url);
        }
        for (name, value) in &feed.headers {
            if is_secret_header(name, &feed.secret_headers) {
                r.add_header_value(value.expose());
            }
        }
        let token = match (&feed.bearer_token_env, &feed.bearer_token_file) {
            (Some(var), _) => std::env::var(var).ok(),
            (None, Some(path)) => std::fs::read_to_string(path).ok(),
            (None, None) => None,
        };
        if let Some(token) = token {
            r.add(token.trim());
        }
        r
    }

    /// Adds a value (ignored when shorter than [`MIN_SECRET_LEN`]).
    pub fn add(&mut self, value: &str) {
        if value.len() < MIN_SECRET_LEN || self.values.iter().any(|v| v.expose() == value) {
            return;
        }
        let at = self
            .values
            .iter()
            .position(|v| v.expose().len() < value.len())
            .unwrap_or(self.values.len());
        self.values.insert(at, Secret::new(value));
    }

    /// Adds a header value, and the credential after its auth scheme (`Bearer x` -> `x`),
    /// which a server may echo alone.
    pub fn add_header_value(&mut self, value: &str) {
        let value = value.trim();
        self.add(value);
        if let Some((_, credential)) = value.split_once(' ') {
            self.add(credential.trim());
        }
    }

    /// Adds the credentials of a URL's userinfo: the password (as written and decoded),
    /// `user:password`, and the `Basic` credential sent for them. A user name alone is not a
    /// secret.
    pub fn add_userinfo(&mut self, url: &url::Url) {
        let Some(password) = url.password() else {
            return;
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = decode(url.username());
        let decoded = decode(password);
        let pair = format!("{user}:{decoded}");
        self.add(password);
        self.add(&decoded);
        self.add(&format!("{}:{password}", url.username()));
        self.add(&base64::engine::general_purpose::STANDARD.encode(&pair));
        self.add(&pair);
    }

    /// Adds every value of `other`.
    pub fn extend(&mut self, other: &Redactor) {
        for v in &other.values {
            self.add(v.expose());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Adds this set's values to the process-wide set that every log line is scrubbed of
    /// ([`scrub_remembered`]).
    pub fn remember(&self) {
        remember(self.values.iter().map(Secret::expose));
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for v in &self.values {
            if out.contains(v.expose()) {
                out = Cow::Owned(out.replace(v.expose(), REDACTED));
            }
        }
        out
    }

    /// [`Redactor::scrub`] in place.
    pub fn scrub_string(&self, text: &mut String) {
        if let Cow::Owned(s) = self.scrub(text) {
            *text = s;
        }
    }
}

/// Most values the process-wide set keeps; beyond, the oldest are forgotten (a bearer token
/// file rewritten every few minutes for months must not grow it without end).
pub const MAX_REMEMBERED: usize = 10_000;

/// Every secret value the process has met (config, token files, Kafka options), for the last
/// line of defence: the log writer scrubs each line of them, whatever part of the bridge (or a
/// library) formatted it.
struct Remembered {
    /// Oldest first.
    values: Vec<String>,
    matcher: Option<AhoCorasick>,
}

fn remembered() -> &'static RwLock<Arc<Remembered>> {
    static SET: std::sync::OnceLock<RwLock<Arc<Remembered>>> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        RwLock::new(Arc::new(Remembered {
            values: Vec::new(),
            matcher: None,
        }))
    })
}

/// Adds values to the process-wide set (those shorter than [`MIN_SECRET_LEN`] are ignored).
pub fn remember<'a>(values: impl IntoIterator<Item = &'a str>) {
    let set = remembered();
    let current = set.read().unwrap_or_else(|p| p.into_inner()).clone();
    let new: Vec<&str> = values
        .into_iter()
        .filter(|v| v.len() >= MIN_SECRET_LEN && !current.values.iter().any(|k| k == v))
        .collect();
    if new.is_empty() {
        return;
    }
    let mut guard = set.write().unwrap_or_else(|p| p.into_inner());
    let mut values = guard.values.clone();
    for v in new {
        if !values.iter().any(|k| k == v) {
            values.push(v.to_string());
        }
    }
    if values.len() > MAX_REMEMBERED {
        values.drain(..values.len() - MAX_REMEMBERED);
    }
    let matcher = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&values)
        .ok();
    *guard = Arc::new(Remembered { values, matcher });
}

/// `text` without any value of the process-wide set.
pub fn scrub_remembered(text: &str) -> Cow<'_, str> {
    let set = remembered()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(matcher) = &set.matcher else {
        return Cow::Borrowed(text);
    };
    if !matcher.is_match(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    matcher.replace_all_with(text, &mut out, |_, _, dst| {
        dst.push_str(REDACTED);
        true
    });
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_format() {
        let s = Secret::new("hunter22");
        assert_eq!(format!("{s} {s:?}"), "[redacted] Secret([redacted])");
        assert_eq!(s.expose(), "hunter22");
        let mut r = Redactor::default();
        r.add("hunter22");
        assert!(!format!("{r:?}").contains("hunter"));
    }

    #[test]
    fn scrubs_userinfo_in_every_form_and_header_credentials() {
        let mut feed = ClientOptions::new("f", "http://user:s3cret%21pw@h/x")
            .header("X-Api-Key", "key-123456")
            .header("X-Trace", "not-secret")
            .header("X-Custom", "Token custom-secret");
        feed.secret_headers = vec!["x-custom".into()];
        let r = Redactor::for_client(&feed);
        let basic = base64::engine::general_purpose::STANDARD.encode("user:s3cret!pw");
        let text = format!(
            "Basic {basic} s3cret!pw s3cret%21pw user:s3cret!pw key-123456 custom-secret not-secret"
        );
        let out = r.scrub(&text);
        for gone in [basic.as_str(), "s3cret", "key-123456", "custom-secret"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert!(
            out.contains("not-secret") && out.contains(REDACTED),
            "{out}"
        );
        // Nor do the options' Debug show them.
        let shown = format!("{feed:?}");
        for gone in ["s3cret", "key-123456", "custom-secret", "not-secret"] {
            assert!(!shown.contains(gone), "{gone} in {shown}");
        }
    }

    #[test]
    fn short_values_are_not_scrubbed_and_longest_wins() {
        let mut r = Redactor::default();
        r.add("abc");
        r.add("pass");
        r.add("password1");
        assert_eq!(r.scrub("abc password1 pass"), "abc [redacted] [redacted]");
        assert!(matches!(r.scrub("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_process_wide_set_scrubs_what_it_was_told() {
        remember(["proc-secret-1", "ab", "proc-secret-1-longer"]);
        assert_eq!(
            scrub_remembered("x proc-secret-1-longer y proc-secret-1 ab"),
            "x [redacted] y [redacted] ab"
        );
        assert!(matches!(scrub_remembered("clean"), Cow::Borrowed(_)));
    }

    #[test]
    fn secret_headers_by_default_and_by_config() {
        assert!(is_secret_header("X-API-Key", &[]));
        assert!(is_secret_header("cookie", &[]));
        assert!(!is_secret_header("X-Custom", &[]));
        assert!(is_secret_header("X-Custom", &["x-custom".into()]));
    }
}
