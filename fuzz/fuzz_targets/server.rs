#![no_main]
//! See `gstudpvid::protocol::fuzzing::server`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gstudpvid::protocol::fuzzing::server(data));
