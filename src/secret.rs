//! Credentials: the types live with the EventSource client ([`crate::sse::secret`], which
//! depends on nothing else in the crate); this module keeps the old path and builds a feed's
//! [`Redactor`] from its configuration. See ARCHITECTURE.md ("Hostile input and bounded
//! resources").

pub use crate::sse::secret::*;

use crate::config::FeedConfig;
use crate::sse::options::ClientOptions;

impl Redactor {
    /// The secrets of a feed known from its configuration (see [`Redactor::for_client`]).
    pub fn for_feed(feed: &FeedConfig) -> Redactor {
        Redactor::for_client(&ClientOptions::from(feed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feeds_secrets_are_scrubbed_and_its_debug_shows_none() {
        let mut feed = FeedConfig::new("f", "http://user:s3cret%21pw@h/x");
        feed.headers.insert("X-Api-Key".into(), "key-123456".into());
        feed.headers.insert("X-Trace".into(), "not-secret".into());
        feed.headers
            .insert("X-Custom".into(), "Token custom-secret".into());
        feed.secret_headers = vec!["x-custom".into()];
        let r = Redactor::for_feed(&feed);
        let out = r.scrub("s3cret!pw key-123456 custom-secret not-secret");
        assert_eq!(out, "[redacted] [redacted] [redacted] not-secret");
        let shown = format!("{feed:?}");
        for gone in ["s3cret", "key-123456", "custom-secret"] {
            assert!(!shown.contains(gone), "{gone} in {shown}");
        }
        assert!(shown.contains("not-secret"), "{shown}");
    }
}
