//! What the file and Kafka templates share: `{feed}` and `{type}` placeholders, and the
//! strftime fields of a file name (rendering, checking, reading a period back from a name).

use std::fmt::Write as _;

use chrono::format::{Item, Parsed, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc, Weekday};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Lit(String),
    Feed,
    Type,
    /// Strftime text: an index into [`Template::formats`].
    Time(usize),
}

/// Times the strftime fields are tried with when a template is checked: a long month and
/// weekday name, single-digit fields, another year.
pub(crate) fn sample_times() -> Vec<DateTime<Utc>> {
    [
        (2026, 9, 30, 23, 59, 59, 999_999_999),
        (2026, 1, 2, 3, 4, 5, 6_000_000),
        (2031, 12, 31, 12, 0, 0, 0),
    ]
    .into_iter()
    .filter_map(|(y, mo, d, h, mi, s, n)| {
        NaiveDate::from_ymd_opt(y, mo, d)?
            .and_hms_nano_opt(h, mi, s, n)
            .map(|t| t.and_utc())
    })
    .collect()
}

/// Renders `format` at `t`; `None` when chrono cannot.
pub(crate) fn format_time(t: DateTime<Utc>, format: &str) -> Option<String> {
    let mut out = String::new();
    write!(out, "{}", t.format(format)).ok()?;
    Some(out)
}

/// Splits a template (one path component, or a whole topic) into literal text and the
/// placeholders `{feed}` and `{type}`. `text` takes each run of literal text: the file sink
/// reads strftime fields in it ([`push_text`]), the Kafka sink keeps it as is. The errors are
/// complete sentences about `raw`.
pub(crate) fn parse_placeholders(
    raw: &str,
    mut text: impl FnMut(&mut Vec<Piece>, &str) -> Result<(), String>,
) -> Result<Vec<Piece>, String> {
    let unbalanced = |brace: &str| {
        format!(
            "unbalanced `{brace}` in `{raw}`: braces are only allowed around the placeholders \
             {{feed}} and {{type}}"
        )
    };
    let mut pieces = Vec::new();
    let mut rest = raw;
    loop {
        let Some(open) = rest.find(['{', '}']) else {
            if !rest.is_empty() {
                text(&mut pieces, rest)?;
            }
            return Ok(pieces);
        };
        if rest[open..].starts_with('}') {
            return Err(unbalanced("}"));
        }
        if open > 0 {
            text(&mut pieces, &rest[..open])?;
        }
        let after = &rest[open + 1..];
        let close = match after.find(['{', '}']) {
            Some(close) if after[close..].starts_with('}') => close,
            _ => return Err(unbalanced("{")),
        };
        match &after[..close] {
            "feed" => pieces.push(Piece::Feed),
            "type" => pieces.push(Piece::Type),
            other => {
                return Err(format!(
                    "unknown placeholder `{{{other}}}`: only {{feed}} and {{type}} are allowed"
                ))
            }
        }
        rest = &after[close + 1..];
    }
}

/// Adds literal text of a file path template, which may hold strftime fields: `formats` is
/// where the strftime texts of the file name go; `None` for a directory, where `%` is refused.
pub(crate) fn push_text(
    pieces: &mut Vec<Piece>,
    text: &str,
    raw: &str,
    formats: Option<&mut Vec<String>>,
) -> Result<(), String> {
    if !text.contains('%') {
        pieces.push(Piece::Lit(text.to_string()));
        return Ok(());
    }
    let Some(formats) = formats else {
        return Err(format!(
            "`{raw}`: strftime fields (`%`) are only allowed in the file name, not in a \
             directory"
        ));
    };
    let items: Vec<Item> = StrftimeItems::new(text).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(format!(
            "`{raw}`: `{text}` is not a valid strftime format (write `%%` for a literal `%`)"
        ));
    }
    let mut rendered = None;
    for t in sample_times() {
        let Some(r) = format_time(t, text) else {
            return Err(format!(
                "`{raw}`: the strftime fields in `{text}` cannot be rendered"
            ));
        };
        if r.contains('/') || r.chars().any(char::is_control) {
            return Err(format!(
                "`{raw}`: the strftime fields in `{text}` would put `/` or a control character \
                 in the file name (as %D, %x, %n and %t do); use fields such as %Y-%m-%d"
            ));
        }
        rendered = Some(r);
    }
    let has_fields = items
        .iter()
        .any(|i| matches!(i, Item::Numeric(..) | Item::Fixed(..)));
    if has_fields {
        formats.push(text.to_string());
        pieces.push(Piece::Time(formats.len() - 1));
    } else {
        // Only `%%` and the like: constant text.
        pieces.push(Piece::Lit(rendered.unwrap_or_default()));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NamePiece {
    Lit(String),
    Time(usize),
}

/// The start of the period a parsed file name names: unset fields below the ones given
/// default to their lowest value (`%Y-%m` is the 1st at 00:00).
pub(crate) fn period_start(parsed: &Parsed) -> Option<NaiveDateTime> {
    if parsed.timestamp().is_some() {
        return parsed.to_naive_datetime_with_offset(0).ok();
    }
    let mut p = parsed.clone();
    if p.isoweek().is_some() || p.week_from_mon().is_some() || p.week_from_sun().is_some() {
        if p.weekday().is_none() {
            let first = if p.week_from_sun().is_some() {
                Weekday::Sun
            } else {
                Weekday::Mon
            };
            p.set_weekday(first).ok()?;
        }
    } else if p.ordinal().is_none() {
        if p.month().is_none() {
            p.set_month(1).ok()?;
        }
        if p.day().is_none() {
            p.set_day(1).ok()?;
        }
    }
    if p.hour_div_12().is_none() && p.hour_mod_12().is_none() {
        p.set_hour(0).ok()?;
    }
    if p.minute().is_none() {
        p.set_minute(0).ok()?;
    }
    if p.second().is_none() {
        p.set_second(0).ok()?;
    }
    if p.nanosecond().is_none() {
        p.set_nanosecond(0).ok()?;
    }
    Some(p.to_naive_date().ok()?.and_time(p.to_naive_time().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::file::FileSinkConfig;
    use crate::sink::kafka::KafkaSinkConfig;

    fn literal(pieces: &mut Vec<Piece>, text: &str) -> Result<(), String> {
        pieces.push(Piece::Lit(text.to_string()));
        Ok(())
    }

    #[test]
    fn placeholders_and_literal_runs() {
        let pieces = parse_placeholders("a{feed}.{type}{feed}z", literal).expect("valid");
        assert_eq!(
            pieces,
            [
                Piece::Lit("a".into()),
                Piece::Feed,
                Piece::Lit(".".into()),
                Piece::Type,
                Piece::Feed,
                Piece::Lit("z".into()),
            ]
        );
        assert_eq!(parse_placeholders("{type}", literal), Ok(vec![Piece::Type]));
    }

    /// The file and Kafka sinks read `{feed}`/`{type}` with this one parser, so a malformed
    /// template gets the same sentence from both.
    #[test]
    fn both_sinks_refuse_the_same_templates_in_the_same_words() {
        for (template, expected) in [
            ("x{feed", "unbalanced `{` in `x{feed`"),
            ("x}", "unbalanced `}` in `x}`"),
            ("{fed}", "unknown placeholder `{fed}`"),
            ("{{type}}", "unbalanced `{` in `{{type}}`"),
        ] {
            let direct = parse_placeholders(template, literal).expect_err(template);
            assert!(direct.contains(expected), "{template}: {direct}");
            let file = FileSinkConfig::new(format!("d/{template}.jsonl")).validate();
            let kafka: KafkaSinkConfig = toml::from_str(&format!(
                "brokers = \"localhost:9092\"\ntopic = \"{template}\""
            ))
            .expect("parses");
            let kafka = kafka.validate();
            for (sink, issues, key) in [("file", &file, "path"), ("kafka", &kafka, "topic")] {
                assert!(
                    issues.iter().any(|(k, m)| k == key && m.contains(expected)),
                    "{sink} sink, {template}: {issues:?}"
                );
            }
        }
    }
}
