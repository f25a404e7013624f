//! Who may read which feed: the access tokens of `serve` (`token_file`).
//!
//! The file holds one token per line, optionally followed by the feeds it may read, as globs:
//!
//! ```text
//! # dashboards: every feed
//! 3f9c2a7e0b8d4c61a5e2f7d9b0c3a8e1
//! # the partner: two feeds only
//! 8d1e6b0f2c9a4e57b3d8f1a6c0e2b9d4 wiki-edits orders-*
//! ```
//!
//! A client presents its token as `Authorization: Bearer TOKEN` or, since a browser's
//! EventSource cannot set headers, as the `access_token` query parameter. Tokens are kept
//! only as SHA-256 digests and compared in constant time, against every token each time, so
//! neither the time an answer takes nor a log line tells anything about them; a client is
//! named in logs by the line of its token (`token_line`), never by the token.
//!
//! The file is read at start (an unreadable or empty file fails the start, naming it) and again
//! on SIGHUP; a reload that fails keeps the tokens in force and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use globset::GlobMatcher;
use subtle::ConstantTimeEq;

/// Tokens shorter than this are refused: a short token is guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token file larger than this is refused (it is read whole, at start and on SIGHUP).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

type Digest = [u8; 32];

fn digest(token: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// One line of the token file.
#[derive(Debug)]
pub struct Grant {
    digest: Digest,
    /// The line of the token file, which names the client in logs.
    pub line: usize,
    /// The feeds this token may read; `None`: every feed.
    feeds: Option<Vec<GlobMatcher>>,
}

impl Grant {
    /// Whether this token may read every feed (its line names no feeds).
    pub fn reads_every_feed(&self) -> bool {
        self.feeds.is_none()
    }

    /// Whether this token may read `feed`.
    pub fn may_read(&self, feed: &str) -> bool {
        self.feeds
            .as_ref()
            .is_none_or(|globs| globs.iter().any(|g| g.is_match(feed)))
    }
}

/// The tokens of one reading of the file.
#[derive(Debug, Default)]
pub struct TokenList {
    grants: Vec<Arc<Grant>>,
}

impl TokenList {
    /// Parses a token file's text; errors name the line.
    pub fn parse(text: &str) -> Result<TokenList, String> {
        // A file read while an editor rewrites it in place can end inside a line, and a line
        // cut right after its token would read every feed: such a file is refused.
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(
                "it does not end with a line break: it looks cut short (being written?); \
                 replace the file by renaming a complete one over it"
                    .into(),
            );
        }
        let mut grants: Vec<Arc<Grant>> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let mut words = content.split_whitespace();
            let Some(token) = words.next() else { continue };
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {line}: the token is {} characters long; use at least {MIN_TOKEN_LEN} \
                     (for example the output of `openssl rand -hex 32`)",
                    token.len()
                ));
            }
            if token.chars().any(|c| c.is_control() || !c.is_ascii()) {
                return Err(format!(
                    "line {line}: a token is printable ASCII (it travels in a header and a URL)"
                ));
            }
            let d = digest(token.as_bytes());
            if let Some(other) = grants.iter().find(|g| g.digest == d) {
                return Err(format!(
                    "line {line}: the same token as on line {}; give each client its own",
                    other.line
                ));
            }
            let mut globs = Vec::new();
            for pattern in words {
                let glob = crate::route::compile_pattern(pattern)
                    .map_err(|e| format!("line {line}: feed pattern: {e}"))?;
                globs.push(glob);
            }
            grants.push(Arc::new(Grant {
                digest: d,
                line,
                feeds: (!globs.is_empty()).then_some(globs),
            }));
        }
        if grants.is_empty() {
            return Err("no tokens in it: every request would be refused".into());
        }
        Ok(TokenList { grants })
    }

    /// The grant of `presented`, if it is one of the tokens. Every token is compared, in
    /// constant time, whichever matches.
    pub fn find(&self, presented: &str) -> Option<Arc<Grant>> {
        let d = digest(presented.as_bytes());
        let mut found = None;
        for grant in &self.grants {
            if bool::from(grant.digest.ct_eq(&d)) {
                found = Some(grant.clone());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

/// Reads and parses a token file; errors name the file.
pub fn read_token_file(path: &Path) -> Result<TokenList, String> {
    use std::io::Read;
    let shown = path.display();
    // Checked before opening: opening a FIFO would wait for a writer, holding the start (or
    // the SIGHUP reload) for ever.
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{shown}: {} bytes, larger than the {MAX_FILE_BYTES} a token file may be",
            meta.len()
        ));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                file = %shown,
                "the token file is readable by every local user; `chmod o-r` it"
            );
        }
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("{shown}: {e}"))?;
    TokenList::parse(&text).map_err(|e| format!("{shown}: {e}"))
}

/// Whether a request may read a feed.
#[derive(Debug)]
pub enum Verdict {
    /// Allowed; the grant when tokens are required (for the log line).
    Allowed(Option<Arc<Grant>>),
    /// No token, or not one of the tokens: 401.
    Unauthenticated,
    /// A valid token that may not read this feed: 403.
    Forbidden(Arc<Grant>),
}

/// The access rules of a running server: open to every client (no token file), or the tokens
/// of the file, re-read on [`Access::reload`].
#[derive(Debug)]
pub struct Access {
    file: Option<PathBuf>,
    tokens: RwLock<Arc<TokenList>>,
}

impl Access {
    /// Every client may read every feed.
    pub fn open() -> Access {
        Access {
            file: None,
            tokens: RwLock::default(),
        }
    }

    /// The tokens of `file`, read now.
    pub fn from_file(file: &Path) -> Result<Access, String> {
        let tokens = read_token_file(file)?;
        Ok(Access {
            file: Some(file.to_path_buf()),
            tokens: RwLock::new(Arc::new(tokens)),
        })
    }

    /// Whether a token is required.
    pub fn requires_token(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the token file again. On failure the tokens in force stay, and the error is
    /// returned for the log.
    pub fn reload(&self) -> Result<Option<usize>, String> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let fresh = read_token_file(file)?;
        let count = fresh.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(Some(count))
    }

    /// The verdict for a request presenting `token` (if any) for `feed` (`None`: a request
    /// about every feed, such as `/metrics`, which only a token for every feed may make).
    pub fn check(&self, token: Option<&str>, feed: Option<&str>) -> Verdict {
        if self.file.is_none() {
            return Verdict::Allowed(None);
        }
        let tokens = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(grant) = token.and_then(|t| tokens.find(t)) else {
            return Verdict::Unauthenticated;
        };
        let allowed = match feed {
            Some(feed) => grant.may_read(feed),
            None => grant.reads_every_feed(),
        };
        if allowed {
            Verdict::Allowed(Some(grant))
        } else {
            Verdict::Forbidden(grant)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn list(text: &str) -> TokenList {
        TokenList::parse(text).unwrap()
    }

    #[test]
    fn tokens_with_and_without_feed_globs() {
        let tokens = list(&format!("# comment\n\n{A}\n  {B} wiki-* orders\n"));
        assert_eq!(tokens.len(), 2);
        let a = tokens.find(A).unwrap();
        assert_eq!(a.line, 3);
        assert!(a.may_read("anything"));
        let b = tokens.find(B).unwrap();
        assert_eq!(b.line, 4);
        assert!(b.may_read("wiki-edits"));
        assert!(b.may_read("orders"));
        assert!(!b.may_read("orders-eu"));
        assert!(!b.may_read("payments"));
        assert!(tokens.find("cccccccccccccccccccccccccccccccc").is_none());
        assert!(tokens.find("").is_none());
        assert!(tokens.find(&A[..31]).is_none(), "a prefix is not the token");
    }

    #[test]
    fn bad_files_name_the_line_and_what_is_wrong() {
        let cases = [
            ("", "no tokens"),
            ("# only comments\n", "no tokens"),
            ("short\n", "line 1: the token is 5 characters long"),
            (&format!("{A} feed-a"), "cut short"),
            (
                &format!("{A}\n{A} feed\n"),
                "line 2: the same token as on line 1",
            ),
            (&format!("\n{A} [unclosed\n"), "line 2: feed pattern"),
            ("aaaaaaaaaaaaaaaaé\n", "line 1: a token is printable ASCII"),
        ];
        for (text, expected) in cases {
            let err = TokenList::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn verdicts_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{A}\n{B} wiki-*\n")).unwrap();
        let access = Access::from_file(&path).unwrap();
        assert!(access.requires_token());
        assert!(matches!(
            access.check(None, Some("wiki-x")),
            Verdict::Unauthenticated
        ));
        assert!(matches!(
            access.check(Some("nope-nope-nope-nope"), Some("wiki-x")),
            Verdict::Unauthenticated
        ));
        assert!(matches!(
            access.check(Some(A), Some("other")),
            Verdict::Allowed(Some(_))
        ));
        assert!(matches!(
            access.check(Some(B), Some("wiki-x")),
            Verdict::Allowed(Some(_))
        ));
        assert!(matches!(
            access.check(Some(B), Some("other")),
            Verdict::Forbidden(_)
        ));
        // A question about every feed (/metrics) needs a token for every feed.
        assert!(matches!(access.check(Some(B), None), Verdict::Forbidden(_)));
        assert!(matches!(access.check(Some(A), None), Verdict::Allowed(_)));

        // Revoke A; a broken file keeps what is in force.
        std::fs::write(&path, format!("{B}\n")).unwrap();
        assert_eq!(access.reload(), Ok(Some(1)));
        assert!(matches!(
            access.check(Some(A), Some("other")),
            Verdict::Unauthenticated
        ));
        std::fs::write(&path, "short\n").unwrap();
        let err = access.reload().unwrap_err();
        assert!(err.contains("tokens") && err.contains("line 1"), "{err}");
        assert!(matches!(
            access.check(Some(B), Some("other")),
            Verdict::Allowed(_)
        ));

        let open = Access::open();
        assert!(!open.requires_token());
        assert!(matches!(
            open.check(None, Some("x")),
            Verdict::Allowed(None)
        ));
        assert!(Access::from_file(&dir.path().join("missing"))
            .unwrap_err()
            .contains("missing"));
    }

    #[test]
    fn a_fifo_or_a_huge_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid, NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns instead of waiting for a writer.
        let err = Access::from_file(&fifo).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let huge = dir.path().join("huge");
        std::fs::write(&huge, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let err = Access::from_file(&huge).unwrap_err();
        assert!(err.contains("larger than"), "{err}");
    }
}
