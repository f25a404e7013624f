//! Text for people (tables, log lines): control characters escaped. Event ids, types and
//! server messages come from the stream, and a raw ESC, BEL or CSI in them would drive the
//! operator's terminal (colours, titles, cursor moves, hidden lines). JSON output is escaped by
//! serde_json already. See ARCHITECTURE.md ("Hostile input and bounded resources").

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// Whether `c` is a control character: C0, DEL or C1.
fn is_control(c: char) -> bool {
    matches!(c, '\0'..='\x1f' | '\x7f'..='\u{9f}')
}

/// `s` with every control character (C0, DEL, C1) written as `\x1b` (C0, DEL) or `\u{85}` (C1).
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// [`escape_controls`] keeping line breaks (`\n`): for text of several lines.
pub fn escape_controls_keep_newlines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    if !s
        .chars()
        .any(|c| is_control(c) && !(keep_newlines && c == '\n'))
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !is_control(c) || (keep_newlines && c == '\n') {
            out.push(c);
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// Formats a value with its control characters escaped (line breaks too).
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut w = EscapingWriter(f);
        write!(w, "{}", self.0)
    }
}

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut w = EscapingWriter(f);
        write!(w, "{:?}", self.0)
    }
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_str(&escape_controls(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_c0_del_and_c1() {
        assert_eq!(
            escape_controls("a\x1b[31mb\x07c\x7fd\u{9b}e\nf\tg"),
            "a\\x1b[31mb\\x07c\\x7fd\\u{9b}e\\x0af\\x09g"
        );
        assert_eq!(escape_controls_keep_newlines("a\nb\rc"), "a\nb\\x0dc");
        assert!(matches!(escape_controls("plain é ü"), Cow::Borrowed(_)));
        assert_eq!(
            format!("{} {:?}", Escaped("x\x1by"), Escaped("q\x07")),
            "x\\x1by \"q\\u{7}\""
        );
    }
}
