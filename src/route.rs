//! Router (TEMPORARY STUB so the crate compiles; the sinks helper replaces this whole file).
#![allow(dead_code, unused_variables)]
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct RouteConfig {
    pub feed: Option<String>,
    pub event: String,
    pub sinks: Vec<String>,
    pub drop: bool,
}
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct RoutingConfig {
    pub default: Vec<String>,
}
pub fn validate_routes(
    routes: &[RouteConfig],
    routing: &RoutingConfig,
    sink_names: &[&str],
    feed_names: &[&str],
) -> Vec<(String, String)> {
    todo!()
}
pub struct Router;
impl Router {
    pub fn new(
        routes: &[RouteConfig],
        routing: &RoutingConfig,
        sinks: &[(String, crate::sink::SinkConfig)],
    ) -> Result<Router, String> {
        todo!()
    }
    pub fn for_feed(&self, feed: &str) -> FeedRouter {
        todo!()
    }
}
pub struct FeedRouter;
impl FeedRouter {
    pub fn route(&mut self, event_type: &str) -> &Decision {
        todo!()
    }
}
pub struct Decision {
    pub sinks: Vec<usize>,
    pub outcome: Outcome,
}
pub enum Outcome {
    Routed,
    Misfit,
    Dropped,
    Unrouted,
}
