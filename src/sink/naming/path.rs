//! Path templates of the file sink: `{feed}`, `{type}` and strftime fields, confined under
//! the template's base directory (ARCHITECTURE.md §7), and the family of file names one
//! rendered path stands for.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use chrono::format::{Item, Parsed, StrftimeItems};
use chrono::{DateTime, NaiveDateTime, Utc};

use super::template::{
    format_time, parse_placeholders, period_start, push_text, sample_times, NamePiece, Piece,
};
use super::{encode_into, encoded_len, is_encodable, MAX_COMPONENT_LEN, MAX_FEED_LEN};

/// Why a feed and event type cannot be rendered into a path. The router keeps such types
/// away from the sink (`FileSinkConfig::accepts_type`), so at write time this is a defect or
/// a feed name the config loader should have refused; the batch is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("feed name {0:?} is not usable in a path")]
    Feed(String),
    #[error("event type {0:?} is not usable in a path")]
    Type(String),
    /// The strftime fields of the file name (as written) rendered a `/` or nothing.
    #[error("the time fields of `{0}` cannot be rendered")]
    Time(String),
    #[error(
        "the file name for feed `{feed}` and type `{event_type}` would be longer than {limit} \
         bytes"
    )]
    TooLong {
        feed: String,
        event_type: String,
        limit: usize,
    },
    #[error("the path has no file name")]
    NoFileName,
}

/// A parsed `path` template.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    /// The leading directories without placeholders (`.` when there are none).
    pub(crate) base: PathBuf,
    /// `base` as it starts a rendered path: with a trailing `/`, or empty for `.`.
    prefix: String,
    /// The components after the base; the last one is the file name, which ends with
    /// `Lit(ext)` when `ext` is not empty.
    pub(crate) components: Vec<Vec<Piece>>,
    uses_type: bool,
    /// The strftime texts of the file name, in order.
    pub(crate) formats: Arc<[String]>,
    /// The longest each format renders to.
    format_len: Vec<usize>,
    /// The file name's extension (from its last `.`, when what follows is plain text), kept
    /// last when a stamp is inserted: `.jsonl`, or empty.
    pub(crate) ext: String,
    /// Bytes the file name keeps free for rotation and compression suffixes.
    reserve: usize,
}

/// Splits a file name into the part that may hold placeholders and strftime fields, and its
/// extension: from the last `.` (not the first character) when only plain text follows.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 && !name[i..].contains(['%', '{', '}']) => name.split_at(i),
        _ => (name, ""),
    }
}

impl Template {
    /// Parses and checks a template; the errors are complete sentences for `path`. `reserve`:
    /// bytes the rendered file name must keep free (rotation and compression suffixes).
    pub(crate) fn parse(s: &str, reserve: usize) -> Result<Template, Vec<String>> {
        if s.is_empty() {
            return Err(vec![
                "must not be empty; for example `data/events/{feed}.jsonl`".into(),
            ]);
        }
        if s.contains('\0') {
            return Err(vec!["must not contain a NUL character".into()]);
        }
        let mut errors = Vec::new();
        let absolute = s.starts_with('/');
        if s.ends_with('/') {
            errors.push("must end with a file name, not `/`".to_string());
        }
        let raws: Vec<&str> = s.split('/').filter(|c| !c.is_empty()).collect();
        let mut components = Vec::new();
        let mut formats = Vec::new();
        let mut ext = String::new();
        for (i, &raw) in raws.iter().enumerate() {
            if raw == "." || raw == ".." {
                errors.push(format!(
                    "must not contain `{raw}` components: files must stay under the template's \
                     base directory"
                ));
                continue;
            }
            if raw.len() > MAX_COMPONENT_LEN {
                errors.push(format!(
                    "`{raw}` is longer than {MAX_COMPONENT_LEN} bytes, too long for a file name"
                ));
            }
            let is_name = i + 1 == raws.len() && !s.ends_with('/');
            let parsed = if is_name {
                let (head, e) = split_ext(raw);
                ext = e.to_string();
                parse_component(head, Some(&mut formats)).map(|mut pieces| {
                    if !e.is_empty() {
                        pieces.push(Piece::Lit(e.to_string()));
                    }
                    pieces
                })
            } else {
                parse_component(raw, None)
            };
            match parsed {
                Ok(pieces) => components.push(pieces),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let has_placeholder = |c: &Vec<Piece>| c.iter().any(|p| !matches!(p, Piece::Lit(_)));
        // The base: the placeholder-free leading directories (never the file name).
        let dirs = components.len().saturating_sub(1);
        let base_len = components[..dirs]
            .iter()
            .position(has_placeholder)
            .unwrap_or(dirs);
        let base_parts: Vec<String> = components[..base_len]
            .iter()
            .map(|c| literal_text(c))
            .collect();
        let any_placeholder = components.iter().any(has_placeholder);
        if absolute && base_len == 0 && any_placeholder {
            return Err(vec![format!(
                "`{s}` puts a placeholder directly under `/`, so event data would choose a \
                 top-level directory or file; start the path with a fixed directory, such as \
                 `/var/lib/sse-bridge/{{feed}}.jsonl`"
            )]);
        }
        let root = if absolute { "/" } else { "" };
        let (base, prefix) = if base_parts.is_empty() {
            let base = if absolute { "/" } else { "." };
            (PathBuf::from(base), root.to_string())
        } else {
            let joined = format!("{root}{}", base_parts.join("/"));
            (PathBuf::from(&joined), format!("{joined}/"))
        };
        let uses_type = components.iter().flatten().any(|p| *p == Piece::Type);
        let samples = sample_times();
        let format_len = formats
            .iter()
            .map(|f| {
                samples
                    .iter()
                    .filter_map(|t| format_time(*t, f))
                    .map(|r| r.len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let template = Template {
            base,
            prefix,
            components: components.split_off(base_len),
            uses_type,
            formats: formats.into(),
            format_len,
            ext,
            reserve,
        };
        template.check_lengths()?;
        template.check_time_order(raws.last().copied().unwrap_or(""))?;
        Ok(template)
    }

    /// The longest a component can render to, given the length of the event type.
    fn max_len(&self, component: &[Piece], type_len: usize) -> usize {
        component
            .iter()
            .map(|p| match p {
                Piece::Lit(l) => l.len(),
                Piece::Feed => MAX_FEED_LEN,
                Piece::Type => type_len,
                Piece::Time(i) => self.format_len.get(*i).copied().unwrap_or(0),
            })
            .sum()
    }

    /// The byte limit of component `i` once rendered.
    fn limit(&self, i: usize) -> usize {
        if i + 1 == self.components.len() {
            MAX_COMPONENT_LEN.saturating_sub(self.reserve)
        } else {
            MAX_COMPONENT_LEN
        }
    }

    /// Components without `{type}` must fit whatever the feed name and the time.
    fn check_lengths(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        for (i, c) in self.components.iter().enumerate() {
            if c.contains(&Piece::Type) {
                continue; // checked per event type by `accepts_type`
            }
            let len = self.max_len(c, 0);
            if len > self.limit(i) {
                let room = if self.reserve > 0 && i + 1 == self.components.len() {
                    format!(
                        ", leaving {} bytes for the rotation and compression suffixes",
                        self.reserve
                    )
                } else {
                    String::new()
                };
                errors.push(format!(
                    "`{}` can render to {len} bytes (with a feed name of {MAX_FEED_LEN} \
                     characters), over the {MAX_COMPONENT_LEN}-byte limit of a file name{room}",
                    literal_text(c)
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// With strftime fields, the file names of different periods must be told apart and
    /// ordered: each sample time must render to a name that parses back to a period start.
    fn check_time_order(&self, raw_name: &str) -> Result<(), Vec<String>> {
        if self.formats.is_empty() {
            return Ok(());
        }
        let series = self
            .series("feed", "type")
            .map_err(|e| vec![e.to_string()])?;
        for t in sample_times() {
            let t = t.naive_utc();
            let ok = series.head_at(t).is_some_and(
                |name| matches!(series.parse_head(&name), Some(Some(key)) if key <= t),
            );
            if !ok {
                return Err(vec![format!(
                    "the strftime fields of `{raw_name}` must name a date (and optionally a \
                     time) so that the files of different periods can be ordered, such as \
                     %Y-%m-%d, %Y-%m-%dT%H or %G-W%V; a weekday, a month name or an hour alone \
                     cannot be ordered"
                )]);
            }
        }
        Ok(())
    }

    /// A file name built from placeholders or strftime fields must end with the sink's own
    /// extension, so that no event type can name a file of another kind (a database, a
    /// config, `x.db-wal`).
    pub(crate) fn check_suffix(&self) -> Option<String> {
        let name = self.components.last()?;
        let templated = name.iter().any(|p| !matches!(p, Piece::Lit(_)));
        if !templated || self.ext.len() > 1 {
            return None;
        }
        Some(format!(
            "the file name `{}` is built from placeholders or strftime fields but does not end \
             with a fixed extension, so an event type could name any file (such as a database \
             beside it); end it with plain text after a `.`, such as `{}.jsonl`",
            self.name(),
            self.name().trim_end_matches('.')
        ))
    }

    /// Whether `target` (absolute, normalised) is a file this template can write, rotate or
    /// compress to, with the base directory at `base` (absolute).
    pub(crate) fn matches(&self, base: &Path, target: &Path) -> bool {
        let Ok(rest) = target.strip_prefix(base) else {
            return false;
        };
        let parts: Vec<String> = rest
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let Some((name, dirs)) = parts.split_last() else {
            return false;
        };
        let Some((file, template_dirs)) = self.components.split_last() else {
            return false;
        };
        if dirs.len() != template_dirs.len()
            || !dirs
                .iter()
                .zip(template_dirs)
                .all(|(d, pieces)| glob_match(pieces, d))
        {
            return false;
        }
        // The name, or the name of a rotated file: the stem, `.STAMP`, the extension.
        let head: &[Piece] = match file.split_last() {
            Some((_ext, head)) if !self.ext.is_empty() => head,
            _ => file,
        };
        let mut rotated = head.to_vec();
        rotated.push(Piece::Lit(".".to_string()));
        rotated.push(Piece::Feed); // stands for the stamp: anything
        rotated.push(Piece::Lit(self.ext.clone()));
        let mut names = vec![name.as_str()];
        for suffix in [".tmp", ".gz", ".zst", ".gz.tmp", ".zst.tmp"] {
            if let Some(n) = name.strip_suffix(suffix) {
                names.push(n);
            }
        }
        names
            .iter()
            .any(|n| glob_match(file, n) || glob_match(&rotated, n))
    }

    /// Whether `t` can be rendered into this template: see [`FileSinkConfig::accepts_type`].
    pub(crate) fn accepts_type(&self, t: &str) -> bool {
        if !self.uses_type {
            return true;
        }
        is_encodable(t)
            && self
                .components
                .iter()
                .enumerate()
                .all(|(i, c)| self.max_len(c, encoded_len(t)) <= self.limit(i))
    }

    /// Appends one rendered piece to `out`.
    fn push_piece(
        &self,
        piece: &Piece,
        feed: &str,
        event_type: &str,
        times: &[String],
        out: &mut String,
    ) -> Result<(), RenderError> {
        match piece {
            Piece::Lit(l) => out.push_str(l),
            Piece::Feed if is_encodable(feed) => encode_into(feed, out),
            Piece::Type if is_encodable(event_type) => encode_into(event_type, out),
            Piece::Feed => return Err(RenderError::Feed(feed.to_string())),
            Piece::Type => return Err(RenderError::Type(event_type.to_string())),
            Piece::Time(i) => match times.get(*i) {
                Some(t) if !t.contains('/') => out.push_str(t),
                _ => return Err(RenderError::Time(self.name())),
            },
        }
        Ok(())
    }

    /// The file name part of the template, as written.
    fn name(&self) -> String {
        self.components
            .last()
            .map(|c| literal_text_with(c, &self.formats))
            .unwrap_or_default()
    }

    /// Renders the path for (`feed`, `event_type`) into `out`; `times` are the rendered
    /// strftime texts.
    pub(crate) fn render(
        &self,
        feed: &str,
        event_type: &str,
        times: &[String],
        out: &mut String,
    ) -> Result<(), RenderError> {
        out.clear();
        out.push_str(&self.prefix);
        for (i, component) in self.components.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            let start = out.len();
            for piece in component {
                self.push_piece(piece, feed, event_type, times, out)?;
            }
            if out.len() - start > self.limit(i) {
                return Err(RenderError::TooLong {
                    feed: feed.to_string(),
                    event_type: event_type.to_string(),
                    limit: self.limit(i),
                });
            }
        }
        Ok(())
    }

    /// The family of files that (`feed`, `event_type`) writes to: its directory, and the file
    /// name with the strftime fields left open.
    pub(crate) fn series(&self, feed: &str, event_type: &str) -> Result<Series, RenderError> {
        let Some((name, dirs)) = self.components.split_last() else {
            return Err(RenderError::NoFileName);
        };
        let mut dir_prefix = self.prefix.clone();
        for component in dirs {
            for piece in component {
                self.push_piece(piece, feed, event_type, &[], &mut dir_prefix)?;
            }
            dir_prefix.push('/');
        }
        let dir = match dir_prefix.strip_suffix('/') {
            Some("") => PathBuf::from("/"),
            Some(d) => PathBuf::from(d),
            None => PathBuf::from("."),
        };
        let name: &[Piece] = match name.split_last() {
            Some((_ext, head)) if !self.ext.is_empty() => head,
            _ => name,
        };
        let mut head: Vec<NamePiece> = Vec::new();
        for piece in name {
            if let Piece::Time(i) = piece {
                head.push(NamePiece::Time(*i));
                continue;
            }
            let mut text = String::new();
            self.push_piece(piece, feed, event_type, &[], &mut text)?;
            match head.last_mut() {
                Some(NamePiece::Lit(l)) => l.push_str(&text),
                _ => head.push(NamePiece::Lit(text)),
            }
        }
        let mut key = dir_prefix.clone();
        for piece in &head {
            match piece {
                NamePiece::Lit(l) => key.push_str(l),
                NamePiece::Time(i) => {
                    let _ = write!(key, "\u{1}{i}\u{1}");
                }
            }
        }
        key.push_str(&self.ext);
        Ok(Series {
            key,
            dir,
            dir_prefix,
            head,
            ext: self.ext.clone(),
            formats: self.formats.clone(),
        })
    }

    /// Defense in depth: whether a rendered path is exactly the base followed by as many
    /// plain components as the template has.
    pub(crate) fn is_confined(&self, rendered: &Path) -> bool {
        let rest = if self.base == Path::new(".") {
            rendered
        } else {
            match rendered.strip_prefix(&self.base) {
                Ok(rest) => rest,
                Err(_) => return false,
            }
        };
        let mut count = 0;
        for c in rest.components() {
            if !matches!(c, Component::Normal(_)) {
                return false;
            }
            count += 1;
        }
        count == self.components.len()
    }
}

/// Splits one path component into literal text and placeholders. `formats`: where the
/// strftime texts of the file name go; `None` for a directory, where `%` is refused.
fn parse_component(raw: &str, mut formats: Option<&mut Vec<String>>) -> Result<Vec<Piece>, String> {
    parse_placeholders(raw, |pieces, text| {
        push_text(pieces, text, raw, formats.as_deref_mut())
    })
}

/// Whether `text` is what `pieces` can render to, a placeholder or strftime field standing
/// for any text.
fn glob_match(pieces: &[Piece], text: &str) -> bool {
    match pieces.split_first() {
        None => text.is_empty(),
        Some((Piece::Lit(l), rest)) => text
            .strip_prefix(l.as_str())
            .is_some_and(|t| glob_match(rest, t)),
        Some((_, rest)) => text
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(text.len()))
            .any(|i| glob_match(rest, &text[i..])),
    }
}

/// `path` made absolute against `cwd`, with `.` and `..` resolved lexically.
pub(crate) fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn literal_text(component: &[Piece]) -> String {
    literal_text_with(component, &[])
}

/// A component as written in the template.
fn literal_text_with(component: &[Piece], formats: &[String]) -> String {
    component
        .iter()
        .map(|p| match p {
            Piece::Lit(l) => l.as_str(),
            Piece::Feed => "{feed}",
            Piece::Type => "{type}",
            Piece::Time(i) => formats.get(*i).map_or("%", String::as_str),
        })
        .collect()
}

/// The files one rendered path stands for: the active file at the path, the files it was
/// rotated to (`HEAD.STAMP.EXT`), with strftime fields the files of other periods
/// (`HEAD'.EXT`, `HEAD'.STAMP.EXT`), and their compressed copies (`.gz`, `.zst`).
#[derive(Debug)]
pub(crate) struct Series {
    /// Identifies the series: the directory and the file name with its fields left open.
    pub(crate) key: String,
    /// The directory, for listing (`.` for the working directory).
    pub(crate) dir: PathBuf,
    /// What a file name in it is prefixed with to make a path, as rendered paths are.
    dir_prefix: String,
    /// The file name without its extension.
    head: Vec<NamePiece>,
    pub(crate) ext: String,
    pub(crate) formats: Arc<[String]>,
}

impl Series {
    pub(crate) fn has_time(&self) -> bool {
        self.head.iter().any(|p| matches!(p, NamePiece::Time(_)))
    }

    pub(crate) fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}{name}", self.dir_prefix))
    }

    /// The active path for the rendered strftime texts `times`.
    pub(crate) fn active_path(&self, times: &[String]) -> String {
        let mut out = self.dir_prefix.clone();
        for piece in &self.head {
            match piece {
                NamePiece::Lit(l) => out.push_str(l),
                NamePiece::Time(i) => out.push_str(times.get(*i).map_or("", String::as_str)),
            }
        }
        out.push_str(&self.ext);
        out
    }

    /// The file name head for time `t`.
    fn head_at(&self, t: NaiveDateTime) -> Option<String> {
        let mut out = String::new();
        for piece in &self.head {
            match piece {
                NamePiece::Lit(l) => out.push_str(l),
                NamePiece::Time(i) => {
                    out.push_str(&format_time(t.and_utc(), self.formats.get(*i)?)?)
                }
            }
        }
        Some(out)
    }

    /// Whether `head` is this series' file name head: `Some(period)` if so, the period being
    /// `None` without strftime fields.
    pub(crate) fn parse_head(&self, head: &str) -> Option<Option<NaiveDateTime>> {
        if !self.has_time() {
            let mut rest = head;
            for piece in &self.head {
                if let NamePiece::Lit(l) = piece {
                    rest = rest.strip_prefix(l.as_str())?;
                }
            }
            return rest.is_empty().then_some(None);
        }
        let mut items = Vec::new();
        for piece in &self.head {
            match piece {
                NamePiece::Lit(l) => items.push(Item::Literal(l.as_str())),
                NamePiece::Time(i) => items.extend(StrftimeItems::new(self.formats.get(*i)?)),
            }
        }
        let mut parsed = Parsed::new();
        chrono::format::parse(&mut parsed, head, items.iter()).ok()?;
        let period = period_start(&parsed)?;
        // Only names this series would write: no other spelling of the same time.
        (self.head_at(period)? == head).then_some(Some(period))
    }

    /// The period of time `now`, with strftime fields.
    pub(crate) fn period_at(&self, now: DateTime<Utc>) -> Option<NaiveDateTime> {
        self.parse_head(&self.head_at(now.naive_utc())?).flatten()
    }
}
