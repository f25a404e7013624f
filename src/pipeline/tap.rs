//! The copy of an event that live observers (`tap`) see.

use std::sync::Arc;

use crate::event::Event;

/// Events kept for live observers (`tap`) that fall behind before they miss some.
pub const TAP_CAPACITY: usize = 4096;

/// Data shown to taps per event: the broadcast ring keeps its last [`TAP_CAPACITY`] events
/// while any tap is connected, so with events of up to `max_event_size` it could hold
/// gigabytes; larger data is cut (with a note) in the tap's copy only, which bounds the ring to
/// 64 MiB (ARCHITECTURE.md, "Hostile input and bounded resources"). Sinks get the whole event.
pub const TAP_MAX_DATA: usize = 16 * 1024;

/// The event as taps see it: itself, or a copy with its data cut to [`TAP_MAX_DATA`].
pub fn for_tap(event: &Arc<Event>) -> Arc<Event> {
    if event.data.len() <= TAP_MAX_DATA {
        return event.clone();
    }
    let mut cut = TAP_MAX_DATA;
    while !event.data.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut data = String::with_capacity(cut + 64);
    data.push_str(&event.data[..cut]);
    let _ = std::fmt::Write::write_fmt(
        &mut data,
        format_args!("…[tap: {} more bytes not shown]", event.data.len() - cut),
    );
    Arc::new(Event {
        feed: event.feed.clone(),
        event_type: event.event_type.clone(),
        data,
        id: event.id.clone(),
        received_at: event.received_at,
        seq: event.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn taps_see_at_most_tap_max_data_of_an_event() {
        let event = |data: String| {
            Arc::new(Event {
                feed: Arc::from("f"),
                event_type: Arc::from("t"),
                data,
                id: Arc::from("7"),
                received_at: Utc::now(),
                seq: 7,
            })
        };
        let small = event("x".repeat(TAP_MAX_DATA));
        assert!(Arc::ptr_eq(&for_tap(&small), &small), "shared, not copied");
        // A multi-byte character across the cut is not split.
        let big = event(format!(
            "{}é{}",
            "x".repeat(TAP_MAX_DATA - 1),
            "y".repeat(100_000)
        ));
        let shown = for_tap(&big);
        assert!(shown.data.starts_with(&"x".repeat(TAP_MAX_DATA - 1)));
        assert!(shown.data.len() < TAP_MAX_DATA + 64, "{}", shown.data.len());
        assert!(
            shown.data.ends_with("…[tap: 100002 more bytes not shown]"),
            "{}",
            &shown.data[TAP_MAX_DATA - 8..]
        );
        assert_eq!((shown.seq, &*shown.id), (7, "7"));
    }
}
