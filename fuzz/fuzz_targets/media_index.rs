#![no_main]
//! See `gstudpvid::protocol::fuzzing::media_index`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| gstudpvid::protocol::fuzzing::media_index(data));
