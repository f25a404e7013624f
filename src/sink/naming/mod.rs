//! Names built from event data (ARCHITECTURE.md §7), in one place for every sink: the
//! `{feed}`/`{type}` templates and strftime fields ([`template`]), file paths confined under
//! their base directory ([`path`]), Kafka topic names ([`topic`]), the length limits, and the
//! reversible encoding that lets any event type (or feed name) be one component of a file
//! name (below).
//!
//! Every byte outside `A-Z a-z 0-9 . _ -` is written `%XX` (two uppercase hex digits of the
//! UTF-8 byte), and so is a leading `.`: the result is never empty of meaning, never `.` or
//! `..`, never hidden, never holds a separator or a control character, and decodes back to
//! exactly the original text (`été` -> `%C3%A9t%C3%A9`, `a/b` -> `a%2Fb`, `..` -> `%2E.`,
//! `%` -> `%25`). Names that need no escape are left as they are, so existing files keep their
//! names. Kafka topics cannot hold `%`, so the Kafka sink does not use this encoding.

pub mod path;
pub mod template;
pub mod topic;

/// Longest feed name (the config loader enforces it); bounds what `{feed}` renders to.
pub const MAX_FEED_LEN: usize = 100;
/// Longest value a placeholder of a file path expands to, encoded.
pub const MAX_VALUE_LEN: usize = 200;
/// Longest file name (one path component) on common filesystems, in bytes.
pub const MAX_COMPONENT_LEN: usize = 255;

/// Whether `v` may replace a placeholder of a file path: not empty, and at most
/// [`MAX_VALUE_LEN`] bytes once encoded into a safe name (never `.` or `..`, never a
/// separator).
pub fn is_encodable(v: &str) -> bool {
    !v.is_empty() && encoded_len(v) <= MAX_VALUE_LEN
}

/// Whether `b` stands for itself in an encoded name.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The length of [`encode`]`(s)`, without building it.
pub fn encoded_len(s: &str) -> usize {
    s.bytes()
        .enumerate()
        .map(|(i, b)| {
            if is_plain(b) && !(i == 0 && b == b'.') {
                1
            } else {
                3
            }
        })
        .sum()
}

/// Appends the safe name of `s` to `out`.
pub fn encode_into(s: &str, out: &mut String) {
    for (i, b) in s.bytes().enumerate() {
        if is_plain(b) && !(i == 0 && b == b'.') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

/// The safe name of `s`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(encoded_len(s));
    encode_into(s, &mut out);
    out
}

/// The text a safe name stands for; `None` when `name` is not exactly what [`encode`] makes
/// of some text (a lowercase or stray `%`, an escape that was not needed, invalid UTF-8).
pub fn decode(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |c: u8| HEX.iter().position(|&h| h == c);
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
            i += 3;
        } else if is_plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let text = String::from_utf8(out).ok()?;
    // One spelling per text: `%41` is not a name the encoder writes for `A`.
    (encode(&text) == name).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples_from_the_docs() {
        for (text, name) in [
            ("message", "message"),
            ("state.db", "state.db"),
            ("..", "%2E."),
            (".hidden", "%2Ehidden"),
            ("été", "%C3%A9t%C3%A9"),
            ("a b", "a%20b"),
            ("a/b", "a%2Fb"),
            ("../../x", "%2E.%2F..%2Fx"),
            ("%", "%25"),
            ("%41", "%2541"),
            ("", ""),
            ("\n\0", "%0A%00"),
        ] {
            assert_eq!(encode(text), name, "{text:?}");
            assert_eq!(encoded_len(text), name.len(), "{text:?}");
            assert_eq!(decode(name).as_deref(), Some(text), "{name:?}");
        }
    }

    #[test]
    fn only_the_encoders_spelling_decodes() {
        for name in [
            "%41", "%c3%a9", "%", "%2", "%ZZ", "a b", "a/b", ".x", "%FF", "é",
        ] {
            assert_eq!(decode(name), None, "{name:?}");
        }
    }

    proptest! {
        #[test]
        fn round_trip_and_safe(s in any::<String>()) {
            let name = encode(&s);
            prop_assert_eq!(name.len(), encoded_len(&s));
            prop_assert!(!name.starts_with('.'));
            prop_assert!(name.bytes().all(|b| is_plain(b) || b == b'%'));
            prop_assert_eq!(decode(&name), Some(s));
        }
    }
}
