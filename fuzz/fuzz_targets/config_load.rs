//! Configuration loading on arbitrary text: parsing (figment + serde), the error messages,
//! and the offline validation never panic, whatever the file says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sse_bridge::config::Config;

fuzz_target!(|input: &[u8]| {
    // A config file is read as UTF-8; anything else is refused before parsing, so only text
    // reaches the loader (lossy decoding keeps the fuzzer's mutations useful).
    let text = String::from_utf8_lossy(input);
    match Config::from_toml_str(&text) {
        Ok(config) => {
            for issue in config.validate() {
                assert!(!issue.key.is_empty() && !issue.message.is_empty());
            }
            // Sinks that build names from event types must decide without panicking.
            for sink in config.sink.values() {
                let _ = sink.accepts_type("message");
                let _ = sink.accepts_type("../x");
            }
        }
        Err(e) => {
            assert!(!e.issues.is_empty());
            let _ = e.to_string();
        }
    }
});
