//! Kafka topic names rendered from a `topic` template: `{feed}` and `{type}` placeholders,
//! Kafka's own rules for a name (1 to 249 characters of `A-Z a-z 0-9 . _ -`, not `.` or
//! `..`). Topics cannot hold `%`, so the safe-name encoding of file names is not used: a type
//! that would make an invalid name is refused at routing time (ARCHITECTURE.md §7).

use super::template::{parse_placeholders, Piece};
use super::MAX_FEED_LEN;

/// Kafka's limit on topic names.
pub const MAX_TOPIC_LEN: usize = 249;

/// Whether `c` may appear in a topic name.
pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Kafka's rules for a topic name.
pub fn is_valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TOPIC_LEN
        && t != "."
        && t != ".."
        && t.chars().all(is_topic_char)
}

/// A parsed `topic`.
#[derive(Debug, Clone)]
pub(crate) struct TopicTemplate {
    pieces: Vec<Piece>,
    literal_len: usize,
    feeds: usize,
    types: usize,
}

impl TopicTemplate {
    /// Parses and checks a template; the errors are complete sentences for `topic`.
    pub(crate) fn parse(s: &str) -> Result<TopicTemplate, Vec<String>> {
        if s.is_empty() {
            return Err(vec![
                "must not be empty; for example `sse.{feed}` or `events`".into(),
            ]);
        }
        let pieces = parse_placeholders(s, |pieces, text| {
            pieces.push(Piece::Lit(text.to_string()));
            Ok(())
        })
        .map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        let mut literal_len = 0;
        for piece in &pieces {
            if let Piece::Lit(l) = piece {
                literal_len += l.len();
                if let Some(bad) = l.chars().find(|c| !is_topic_char(*c)) {
                    errors.push(format!(
                        "{bad:?} cannot be part of a Kafka topic name: only A-Z a-z 0-9 . _ - \
                         are allowed"
                    ));
                }
            }
        }
        let feeds = pieces.iter().filter(|p| **p == Piece::Feed).count();
        let types = pieces.iter().filter(|p| **p == Piece::Type).count();
        if feeds == 0 && types == 0 && (s == "." || s == "..") {
            errors.push(format!("`{s}` is not a valid Kafka topic name"));
        }
        let longest = literal_len + feeds * MAX_FEED_LEN + types;
        if longest > MAX_TOPIC_LEN {
            errors.push(format!(
                "too long: Kafka topic names have at most {MAX_TOPIC_LEN} characters, and this \
                 one can reach {longest} (counting {MAX_FEED_LEN} for a feed name and at least \
                 1 for a type)"
            ));
        }
        if errors.is_empty() {
            Ok(TopicTemplate {
                pieces,
                literal_len,
                feeds,
                types,
            })
        } else {
            Err(errors)
        }
    }

    /// Whether `t` can be rendered into this template: see `KafkaSinkConfig::accepts_type`.
    pub(crate) fn accepts_type(&self, t: &str) -> bool {
        if self.types == 0 {
            return true;
        }
        let fits = !t.is_empty()
            && t.chars().all(is_topic_char)
            && self.literal_len + self.feeds * MAX_FEED_LEN + self.types * t.len() <= MAX_TOPIC_LEN;
        if !fits {
            return false;
        }
        if self.feeds == 0 {
            // A name made of the type alone must not be `.` or `..`.
            let mut out = String::new();
            self.render("", t, &mut out);
            return is_valid_topic(&out);
        }
        true
    }

    /// Renders the topic for (`feed`, `event_type`) into `out` (unchecked).
    pub(crate) fn render(&self, feed: &str, event_type: &str, out: &mut String) {
        out.clear();
        for piece in &self.pieces {
            match piece {
                Piece::Lit(l) => out.push_str(l),
                Piece::Feed => out.push_str(feed),
                Piece::Type => out.push_str(event_type),
                // A topic template has no strftime fields.
                Piece::Time(_) => {}
            }
        }
    }
}
