//! The parser on arbitrary bytes split at arbitrary points: it never panics, and every split
//! gives the same items, the same last event ID, the same `retry` value and the same kind of
//! error as the whole input pushed at once (ARCHITECTURE.md §2), with the default limits and with
//! small ones that the input chooses.
//!
//! Input layout: byte 0 = number of cuts (mod 16); then two bytes per cut (little-endian
//! offsets, taken modulo the stream length + 1 and sorted); then one byte choosing the small
//! limits; the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sse_bridge::sse::parser::{Item, Limits, Parser};

/// Everything observable after feeding a stream.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    items: Vec<Item>,
    /// The kind of the first error; its size may differ with the split.
    error: Option<std::mem::Discriminant<sse_bridge::sse::parser::ParseError>>,
    last_event_id: String,
    retry: Option<u64>,
}

fn run(limits: Limits, chunks: &[&[u8]]) -> Outcome {
    let mut parser = Parser::new(limits);
    let mut items = Vec::new();
    let mut error = None;
    for chunk in chunks {
        if let Err(e) = parser.push(chunk, &mut items) {
            error = Some(std::mem::discriminant(&e));
            // The error is sticky until a new stream starts.
            assert_eq!(parser.push(b"data: x\n\n", &mut items), Err(e));
            break;
        }
    }
    parser.finish();
    Outcome {
        items,
        error,
        last_event_id: parser.last_event_id().to_owned(),
        retry: parser.take_retry(),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&ncuts, rest)) = input.split_first() else {
        return;
    };
    let ncuts = usize::from(ncuts % 16);
    if rest.len() < 2 * ncuts + 1 {
        return;
    }
    let (cut_bytes, rest) = rest.split_at(2 * ncuts);
    let (&lim, stream) = rest.split_first().expect("length checked above");

    let mut cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        chunks.push(&stream[start..cut]);
        start = cut;
    }
    chunks.push(&stream[start..]);

    let small = Limits {
        max_line_bytes: usize::from(lim & 0x0F) * 4,
        max_event_bytes: usize::from(lim >> 4) * 4,
        max_id_bytes: usize::from(lim & 0x0F) * 2,
    };
    for limits in [Limits::default(), small] {
        let whole = run(limits, &[stream]);
        let split = run(limits, &chunks);
        assert_eq!(split, whole, "limits {limits:?}, chunks {chunks:?}");
        // Every item is complete, valid data.
        for item in &whole.items {
            if let Item::Event(e) = item {
                assert!(!e.event_type.is_empty());
                assert!(e.data.len() <= limits.max_event_bytes);
            }
        }
    }
});
