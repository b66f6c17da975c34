//! Arbitrary bytes as a wrapped key: never a panic, and whatever parses is
//! canonical (re-encodes to the same bytes).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keybroker::fuzzing::envelope(data);
});
