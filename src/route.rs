//! The router: (feed, event type) -> sinks (ARCHITECTURE.md §5).
//!
//! # Semantics
//!
//! - `[[route]]` tables are tried in the order they appear in the file; the FIRST route whose
//!   `feed` and `event` both match decides, later routes are not consulted.
//! - A matching route with `drop = true` drops the event: it is counted as dropped and
//!   treated as acknowledged (the checkpoint moves past it).
//! - A matching route with `sinks` sends the event to all of them. If any of them cannot
//!   store this event type (a file sink with `{type}` in its path and a type whose encoded
//!   file name would be too long, or a Kafka topic template and a type that is not a valid
//!   topic name; ARCHITECTURE.md §7), the whole event goes to the default route instead
//!   and is counted as a misfit; if the default route cannot take it either, or there is none,
//!   it is unrouted.
//! - An event that matches no route goes to the default route (`[routing] default`). With no
//!   default route it is unrouted.
//! - Unrouted events are counted (and logged at WARN with the feed and type, at most every
//!   10 s per feed) and treated as acknowledged: never silently lost, but not stored either.
//!   Misfits are logged the same way.
//!
//! Patterns (`feed`, `event`) are exact names or globs: `*` matches any run of characters,
//! `?` one character, `[abc]` / `[a-z]` / `[!a-z]` a character class, `{a,b}` alternatives,
//! and `\` escapes the next character. Matching is case-sensitive and covers the whole name.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::sink::SinkConfig;

/// Event types whose decision a [`FeedRouter`] remembers. Types come from the stream
/// (untrusted), so beyond this many distinct types decisions are computed each time.
const MAX_CACHED_TYPES: usize = 1024;

/// `[[route]]`: sends the events of matching feeds and types to sinks, or drops them.
/// Routes are tried in file order and the first match decides.
///
/// ```toml
/// [[route]]
/// feed = "recentchange"      # optional: all feeds when absent
/// event = "log*"             # exact event type or glob; default "*"
/// sinks = ["archive"]
///
/// [[route]]
/// event = "heartbeat"
/// drop = true                # matching events are counted and not stored
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The feed name this route applies to: an exact name or a glob such as `wiki-*`.
    /// Absent: every feed. A pattern that matches no configured feed is an error (a typo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed: Option<String>,
    /// The SSE event type: an exact type (`message` is the type of events whose stream named
    /// none) or a glob (`log*`, `{edit,new}`). Default `*`: every type.
    #[serde(default = "default_event")]
    pub event: String,
    /// The sinks (names of `[sink.NAME]` tables) that store matching events; every one of
    /// them must acknowledge an event before the feed's checkpoint moves past it. Set either
    /// `sinks` or `drop = true`.
    #[serde(default)]
    pub sinks: Vec<String>,
    /// `true`: matching events are dropped, counted, and treated as stored (the checkpoint
    /// moves past them). Default `false`.
    #[serde(default)]
    pub drop: bool,
}

fn default_event() -> String {
    "*".to_string()
}

/// `[routing]`: what happens to events that no `[[route]]` matches.
///
/// ```toml
/// [routing]
/// default = ["archive"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The default route: sinks that store events matching no `[[route]]`, and events whose
    /// route's sinks cannot store their type (counted as misfits). Empty (the default): such
    /// events are counted as unrouted and not stored.
    #[serde(default)]
    pub default: Vec<String>,
}

/// A feed or event-type pattern that is not a valid glob.
#[derive(Debug, thiserror::Error)]
#[error("`{pattern}` is not a valid glob: {kind}")]
pub struct PatternError {
    pub pattern: String,
    kind: globset::ErrorKind,
}

/// Compiles a feed or event-type pattern the way every part of the bridge reads one (routes,
/// `/tap` and `tap`, `serve ?type=`, `replay --type`): `*` also matches `/` and `.`, and `\`
/// escapes the next character.
pub fn compile_pattern(pattern: &str) -> Result<GlobMatcher, PatternError> {
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| PatternError {
            pattern: pattern.to_string(),
            kind: e.kind().clone(),
        })
}

fn compile(pattern: &str) -> Result<GlobMatcher, PatternError> {
    compile_pattern(pattern)
}

/// Offline checks of `[[route]]` and `[routing]`, as `(key, message)` with keys such as
/// `route[2].sinks[0]`.
pub fn validate_routes(
    routes: &[RouteConfig],
    routing: &RoutingConfig,
    sink_names: &[&str],
    feed_names: &[&str],
) -> Vec<(String, String)> {
    let mut issues = Vec::new();
    let known_sinks = || {
        if sink_names.is_empty() {
            "none are configured".to_string()
        } else {
            format!("configured sinks: {}", sink_names.join(", "))
        }
    };
    let check_sinks = |issues: &mut Vec<(String, String)>, key: &str, sinks: &[String]| {
        for (j, sink) in sinks.iter().enumerate() {
            if !sink_names.contains(&sink.as_str()) {
                issues.push((
                    format!("{key}[{j}]"),
                    format!("no sink named `{sink}` ({})", known_sinks()),
                ));
            } else if sinks[..j].contains(sink) {
                issues.push((
                    format!("{key}[{j}]"),
                    format!("sink `{sink}` is listed twice"),
                ));
            }
        }
    };

    // The index of an earlier route that matches every event of every feed, if any.
    let mut catch_all: Option<usize> = None;
    for (i, route) in routes.iter().enumerate() {
        let key = |k: &str| format!("route[{i}].{k}");
        if let Some(feed) = &route.feed {
            match compile(feed) {
                Err(e) => issues.push((key("feed"), e.to_string())),
                Ok(m) => {
                    if !feed_names.iter().any(|f| m.is_match(f)) {
                        let known = if feed_names.is_empty() {
                            "no feeds are configured".to_string()
                        } else {
                            format!("configured feeds: {}", feed_names.join(", "))
                        };
                        issues.push((
                            key("feed"),
                            format!("`{feed}` matches no configured feed ({known})"),
                        ));
                    }
                }
            }
        }
        if route.event.is_empty() {
            issues.push((
                key("event"),
                "must not be empty; use \"*\" for every event type".to_string(),
            ));
        } else if let Err(e) = compile(&route.event) {
            issues.push((key("event"), e.to_string()));
        }
        match (route.sinks.is_empty(), route.drop) {
            (false, true) => issues.push((
                key("drop"),
                "a route either sends events to `sinks` or drops them; set only one".to_string(),
            )),
            (true, false) => issues.push((
                key("sinks"),
                "must name at least one sink, or set `drop = true` to drop matching events"
                    .to_string(),
            )),
            _ => {}
        }
        check_sinks(&mut issues, &key("sinks"), &route.sinks);
        if let Some(earlier) = catch_all {
            issues.push((
                format!("route[{i}]"),
                format!(
                    "can never match: route[{earlier}] before it matches every event of every \
                     feed (the first matching route decides)"
                ),
            ));
        } else if route.event == "*" && route.feed.as_deref().is_none_or(|f| f == "*") {
            catch_all = Some(i);
        }
    }
    check_sinks(&mut issues, "routing.default", &routing.default);
    issues
}

/// What happens to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to the sinks of the matching route, or of the default route when none matched.
    Routed,
    /// The matching route's sinks cannot store this type: sent to the default route.
    Misfit,
    /// A `drop = true` route matched.
    Dropped,
    /// No route took it and the default route is absent or cannot store it: not stored.
    Unrouted,
}

/// The routing decision for one (feed, event type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Indices into the sink list given to [`Router::new`]; empty when not stored.
    pub sinks: Vec<usize>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
enum Action {
    Sinks(Vec<usize>),
    Drop,
}

#[derive(Debug, Clone)]
struct Route {
    feed: Option<GlobMatcher>,
    event: GlobMatcher,
    action: Action,
}

/// The compiled routing table, shared by all feeds.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
    default: Vec<usize>,
    sinks: Arc<[SinkConfig]>,
}

/// Maps sink names to indices in `sinks`, skipping duplicates.
fn indices(
    names: &[String],
    sinks: &[(String, SinkConfig)],
    key: &str,
) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let index = sinks
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| format!("{key}: no sink named `{name}`"))?;
        if !out.contains(&index) {
            out.push(index);
        }
    }
    Ok(out)
}

impl Router {
    /// Routes nothing anywhere (used while shutting down).
    pub fn empty() -> Router {
        Router {
            routes: Vec::new(),
            default: Vec::new(),
            sinks: Arc::from(Vec::new()),
        }
    }

    /// Compiles the routes. Sink indices in decisions are positions in `sinks`. Fails on what
    /// [`validate_routes`] reports as unknown sinks or bad globs.
    pub fn new(
        routes: &[RouteConfig],
        routing: &RoutingConfig,
        sinks: &[(String, SinkConfig)],
    ) -> Result<Router, String> {
        let mut compiled = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            let feed = match &r.feed {
                Some(f) => Some(compile(f).map_err(|e| format!("route[{i}].feed: {e}"))?),
                None => None,
            };
            let event = compile(&r.event).map_err(|e| format!("route[{i}].event: {e}"))?;
            let action = if r.drop {
                if !r.sinks.is_empty() {
                    return Err(format!(
                        "route[{i}]: set either `sinks` or `drop`, not both"
                    ));
                }
                Action::Drop
            } else {
                Action::Sinks(indices(&r.sinks, sinks, &format!("route[{i}].sinks"))?)
            };
            compiled.push(Route {
                feed,
                event,
                action,
            });
        }
        Ok(Router {
            routes: compiled,
            default: indices(&routing.default, sinks, "routing.default")?,
            sinks: sinks.iter().map(|(_, c)| c.clone()).collect(),
        })
    }

    /// The routes that apply to `feed`, with a per-type decision cache. Owned, so a feed task
    /// can keep it.
    pub fn for_feed(&self, feed: &str) -> FeedRouter {
        FeedRouter {
            routes: self
                .routes
                .iter()
                .filter(|r| r.feed.as_ref().is_none_or(|m| m.is_match(feed)))
                .map(|r| (r.event.clone(), r.action.clone()))
                .collect(),
            default: self.default.clone(),
            sinks: self.sinks.clone(),
            cache: HashMap::new(),
            uncached: Decision {
                sinks: Vec::new(),
                outcome: Outcome::Unrouted,
            },
        }
    }
}

/// Routes the events of one feed.
#[derive(Debug)]
pub struct FeedRouter {
    routes: Vec<(GlobMatcher, Action)>,
    default: Vec<usize>,
    sinks: Arc<[SinkConfig]>,
    cache: HashMap<String, Decision>,
    /// Holds the decision for a type beyond the cache limit.
    uncached: Decision,
}

impl FeedRouter {
    /// The decision for an event of this type (see the module docs for the rules).
    pub fn route(&mut self, event_type: &str) -> &Decision {
        if self.cache.contains_key(event_type) {
            return &self.cache[event_type];
        }
        let decision = self.decide(event_type);
        if self.cache.len() < MAX_CACHED_TYPES {
            self.cache.entry(event_type.to_string()).or_insert(decision)
        } else {
            self.uncached = decision;
            &self.uncached
        }
    }

    fn accepts(&self, sinks: &[usize], event_type: &str) -> bool {
        sinks.iter().all(|&i| {
            self.sinks
                .get(i)
                .is_some_and(|s| s.accepts_type(event_type))
        })
    }

    fn to_default(&self, event_type: &str, outcome: Outcome) -> Decision {
        if !self.default.is_empty() && self.accepts(&self.default, event_type) {
            Decision {
                sinks: self.default.clone(),
                outcome,
            }
        } else {
            Decision {
                sinks: Vec::new(),
                outcome: Outcome::Unrouted,
            }
        }
    }

    fn decide(&self, event_type: &str) -> Decision {
        let Some((_, action)) = self.routes.iter().find(|(m, _)| m.is_match(event_type)) else {
            return self.to_default(event_type, Outcome::Routed);
        };
        match action {
            Action::Drop => Decision {
                sinks: Vec::new(),
                outcome: Outcome::Dropped,
            },
            Action::Sinks(sinks) if self.accepts(sinks, event_type) => Decision {
                sinks: sinks.clone(),
                outcome: Outcome::Routed,
            },
            Action::Sinks(_) => self.to_default(event_type, Outcome::Misfit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::file::{FileSinkConfig, FsyncPolicy};
    use crate::sink::stdout::StdoutSinkConfig;
    use crate::sink::BufferConfig;

    fn file(path: &str) -> SinkConfig {
        SinkConfig::File(FileSinkConfig {
            fsync: FsyncPolicy::Always,
            ..FileSinkConfig::new(path)
        })
    }

    fn stdout() -> SinkConfig {
        SinkConfig::Stdout(StdoutSinkConfig {
            buffer: BufferConfig::default(),
        })
    }

    /// Sinks 0 `a` (file by feed), 1 `b` (stdout), 2 `typed` (file with {type}).
    fn sinks() -> Vec<(String, SinkConfig)> {
        vec![
            ("a".into(), file("data/{feed}.jsonl")),
            ("b".into(), stdout()),
            ("typed".into(), file("data/{feed}/{type}.jsonl")),
        ]
    }

    fn route(feed: Option<&str>, event: &str, sinks: &[&str]) -> RouteConfig {
        RouteConfig {
            feed: feed.map(String::from),
            event: event.into(),
            sinks: sinks.iter().map(|s| s.to_string()).collect(),
            drop: false,
        }
    }

    fn drop_route(feed: Option<&str>, event: &str) -> RouteConfig {
        RouteConfig {
            drop: true,
            ..route(feed, event, &[])
        }
    }

    fn routing(default: &[&str]) -> RoutingConfig {
        RoutingConfig {
            default: default.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn decide(router: &Router, feed: &str, event_type: &str) -> (Vec<usize>, Outcome) {
        let mut fr = router.for_feed(feed);
        let d = fr.route(event_type).clone();
        (d.sinks, d.outcome)
    }

    #[test]
    fn config_parsing_defaults_and_unknown_keys() {
        let r: RouteConfig = toml::from_str("sinks = [\"a\"]").unwrap();
        assert_eq!(r, route(None, "*", &["a"]));
        let r: RouteConfig = toml::from_str("feed = \"f\"\nevent = \"e\"\ndrop = true").unwrap();
        assert_eq!(r, drop_route(Some("f"), "e"));
        assert!(toml::from_str::<RouteConfig>("sink = [\"a\"]").is_err());
        let d: RoutingConfig = toml::from_str("").unwrap();
        assert_eq!(d, RoutingConfig::default());
        assert!(toml::from_str::<RoutingConfig>("defaults = []").is_err());
    }

    #[test]
    fn first_match_decides() {
        let routes = [
            route(None, "edit", &["b"]),
            route(None, "*", &["a"]),
            route(None, "edit", &["typed"]),
        ];
        let router = Router::new(&routes, &routing(&[]), &sinks()).unwrap();
        assert_eq!(decide(&router, "f", "edit"), (vec![1], Outcome::Routed));
        assert_eq!(decide(&router, "f", "other"), (vec![0], Outcome::Routed));
    }

    #[test]
    fn several_sinks_and_duplicates() {
        let routes = [route(None, "*", &["b", "a", "b"])];
        let router = Router::new(&routes, &routing(&[]), &sinks()).unwrap();
        assert_eq!(decide(&router, "f", "x"), (vec![1, 0], Outcome::Routed));
    }

    #[test]
    fn feed_filter_exact_and_glob() {
        let routes = [
            route(Some("wiki"), "*", &["a"]),
            route(Some("news-*"), "*", &["b"]),
        ];
        let router = Router::new(&routes, &routing(&["typed"]), &sinks()).unwrap();
        assert_eq!(decide(&router, "wiki", "m"), (vec![0], Outcome::Routed));
        assert_eq!(decide(&router, "news-1", "m"), (vec![1], Outcome::Routed));
        assert_eq!(
            decide(&router, "wikipedia", "m"),
            (vec![2], Outcome::Routed)
        );
        assert_eq!(decide(&router, "news", "m"), (vec![2], Outcome::Routed));
    }

    #[test]
    fn event_globs() {
        let routes = [
            route(None, "log*", &["a"]),
            route(None, "{edit,new}", &["b"]),
            route(None, "v?", &["typed"]),
            route(None, "\\*", &["a", "b"]),
        ];
        let router = Router::new(&routes, &routing(&[]), &sinks()).unwrap();
        assert_eq!(decide(&router, "f", "log").0, [0]);
        assert_eq!(decide(&router, "f", "log.v2/x").0, [0]);
        assert_eq!(decide(&router, "f", "edit").0, [1]);
        assert_eq!(decide(&router, "f", "new").0, [1]);
        assert_eq!(
            decide(&router, "f", "Edit").1,
            Outcome::Unrouted,
            "case-sensitive"
        );
        assert_eq!(decide(&router, "f", "v1").0, [2]);
        assert_eq!(
            decide(&router, "f", "v12").1,
            Outcome::Unrouted,
            "whole-name match"
        );
        assert_eq!(decide(&router, "f", "*").0, [0, 1]);
        assert_eq!(decide(&router, "f", "x*").1, Outcome::Unrouted);
    }

    #[test]
    fn drop_route_drops() {
        let routes = [drop_route(None, "heartbeat"), route(None, "*", &["a"])];
        let router = Router::new(&routes, &routing(&["b"]), &sinks()).unwrap();
        assert_eq!(
            decide(&router, "f", "heartbeat"),
            (vec![], Outcome::Dropped)
        );
        assert_eq!(decide(&router, "f", "x"), (vec![0], Outcome::Routed));
    }

    #[test]
    fn no_match_goes_to_default_or_is_unrouted() {
        let routes = [route(Some("wiki"), "edit", &["a"])];
        let with_default = Router::new(&routes, &routing(&["b"]), &sinks()).unwrap();
        assert_eq!(
            decide(&with_default, "wiki", "log"),
            (vec![1], Outcome::Routed)
        );
        assert_eq!(
            decide(&with_default, "other", "edit"),
            (vec![1], Outcome::Routed)
        );
        let without = Router::new(&routes, &routing(&[]), &sinks()).unwrap();
        assert_eq!(decide(&without, "wiki", "log"), (vec![], Outcome::Unrouted));
        let nothing = Router::new(&[], &routing(&[]), &sinks()).unwrap();
        assert_eq!(
            decide(&nothing, "wiki", "edit"),
            (vec![], Outcome::Unrouted)
        );
        let only_default = Router::new(&[], &routing(&["a", "b"]), &sinks()).unwrap();
        assert_eq!(
            decide(&only_default, "x", "y"),
            (vec![0, 1], Outcome::Routed)
        );
    }

    #[test]
    fn misfit_goes_to_default() {
        let routes = [route(None, "*", &["b", "typed"])];
        let router = Router::new(&routes, &routing(&["a"]), &sinks()).unwrap();
        assert_eq!(decide(&router, "f", "edit"), (vec![1, 2], Outcome::Routed));
        // Any spelling fits a file name once encoded: `../etc` and `.hidden` are routed.
        assert_eq!(
            decide(&router, "f", "../etc"),
            (vec![1, 2], Outcome::Routed)
        );
        assert_eq!(
            decide(&router, "f", ".hidden"),
            (vec![1, 2], Outcome::Routed)
        );
        // `typed` cannot take a type whose encoded name is too long: the whole event goes to
        // the default, not to `b`.
        assert_eq!(
            decide(&router, "f", &"x".repeat(201)),
            (vec![0], Outcome::Misfit)
        );
        assert_eq!(
            decide(&router, "f", &"/".repeat(67)),
            (vec![0], Outcome::Misfit)
        );
    }

    #[test]
    fn misfit_without_usable_default_is_unrouted() {
        let routes = [route(None, "*", &["typed"])];
        let none = Router::new(&routes, &routing(&[]), &sinks()).unwrap();
        assert_eq!(
            decide(&none, "f", &"/".repeat(67)),
            (vec![], Outcome::Unrouted)
        );
        let unfit_default = Router::new(&routes, &routing(&["b", "typed"]), &sinks()).unwrap();
        assert_eq!(
            decide(&unfit_default, "f", &"/".repeat(67)),
            (vec![], Outcome::Unrouted)
        );
        // No route matched and the default cannot take the type: unrouted too.
        let default_only = Router::new(&[], &routing(&["typed"]), &sinks()).unwrap();
        assert_eq!(
            decide(&default_only, "f", &" ".repeat(67)),
            (vec![], Outcome::Unrouted)
        );
        assert_eq!(decide(&default_only, "f", "ab"), (vec![2], Outcome::Routed));
    }

    #[test]
    fn decisions_are_cached_up_to_the_limit() {
        let routes = [route(None, "keep*", &["a"])];
        let router = Router::new(&routes, &routing(&["b"]), &sinks()).unwrap();
        let mut fr = router.for_feed("f");
        for i in 0..MAX_CACHED_TYPES + 500 {
            let t = format!("t{i}");
            assert_eq!(fr.route(&t).sinks, [1]);
        }
        assert_eq!(fr.cache.len(), MAX_CACHED_TYPES);
        // Beyond the cap, decisions are still right.
        assert_eq!(fr.route("keep-going").sinks, [0]);
        assert_eq!(fr.route("t0").sinks, [1]);
        assert_eq!(fr.route("keep-going").outcome, Outcome::Routed);
        assert_eq!(fr.cache.len(), MAX_CACHED_TYPES);
    }

    #[test]
    fn new_rejects_what_validation_rejects() {
        let s = sinks();
        assert!(
            Router::new(&[route(None, "*", &["nope"])], &routing(&[]), &s)
                .unwrap_err()
                .contains("route[0].sinks: no sink named `nope`")
        );
        assert!(Router::new(&[], &routing(&["nope"]), &s)
            .unwrap_err()
            .contains("routing.default"));
        assert!(Router::new(&[route(None, "[", &["a"])], &routing(&[]), &s)
            .unwrap_err()
            .contains("route[0].event"));
        let both = RouteConfig {
            drop: true,
            ..route(None, "*", &["a"])
        };
        assert!(Router::new(&[both], &routing(&[]), &s).is_err());
    }

    fn keys(issues: &[(String, String)]) -> Vec<&str> {
        issues.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn validation_accepts_a_good_table() {
        let routes = [
            route(Some("wiki"), "edit", &["a", "b"]),
            route(Some("w*"), "log*", &["typed"]),
            drop_route(None, "heartbeat"),
            route(None, "*", &["a"]),
        ];
        let issues = validate_routes(&routes, &routing(&["b"]), &["a", "b", "typed"], &["wiki"]);
        assert!(issues.is_empty(), "{issues:?}");
    }

    #[test]
    fn validation_names_keys() {
        let routes = [
            route(Some("wiki"), "*", &["a", "nope", "a"]),
            route(Some("[bad"), "*", &["a"]),
            route(Some("wikk"), "[bad", &["a"]),
            route(None, "", &[]),
            RouteConfig {
                drop: true,
                ..route(None, "x", &["a"])
            },
        ];
        let issues = validate_routes(
            &routes,
            &routing(&["b", "missing"]),
            &["a", "b"],
            &["wiki", "news"],
        );
        assert_eq!(
            keys(&issues),
            [
                "route[0].sinks[1]",
                "route[0].sinks[2]",
                "route[1].feed",
                "route[2].feed",
                "route[2].event",
                "route[3].event",
                "route[3].sinks",
                "route[4].drop",
                "routing.default[1]",
            ],
            "{issues:#?}"
        );
        let message = |k: &str| &issues.iter().find(|(key, _)| key == k).unwrap().1;
        assert!(message("route[0].sinks[1]").contains("no sink named `nope`"));
        assert!(message("route[0].sinks[1]").contains("configured sinks: a, b"));
        assert!(message("route[0].sinks[2]").contains("listed twice"));
        assert!(message("route[1].feed").contains("not a valid glob"));
        assert!(message("route[2].feed").contains("matches no configured feed"));
        assert!(message("route[2].feed").contains("wiki, news"));
        assert!(message("route[2].event").contains("`[bad`"));
        assert!(message("route[3].sinks").contains("drop = true"));
        assert!(message("route[4].drop").contains("set only one"));
        assert!(message("routing.default[1]").contains("`missing`"));
    }

    #[test]
    fn validation_flags_routes_after_a_catch_all() {
        let routes = [
            route(Some("wiki"), "*", &["a"]),
            route(None, "*", &["a"]),
            route(None, "edit", &["b"]),
        ];
        let issues = validate_routes(&routes, &routing(&[]), &["a", "b"], &["wiki"]);
        assert_eq!(keys(&issues), ["route[2]"]);
        assert!(issues[0].1.contains("route[1]"));
    }
}
