//! Arbitrary bytes decoded as each request message (the first byte picks
//! which) and handed to its handler on a real server (SQLite registry,
//! platform keyring, no network). Never a panic.
#![no_main]

use std::sync::LazyLock;

use keybroker::fuzzing::RequestHarness;

static HARNESS: LazyLock<RequestHarness> =
    LazyLock::new(|| RequestHarness::new().expect("fuzz harness"));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = HARNESS.handle(data);
});
