#![no_main]
//! See `gstudpvid::protocol::fuzzing::decode`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gstudpvid::protocol::fuzzing::decode(data));
