//! `parse_request` on arbitrary bytes from a fixed user; accepted sends must keep every limit and
//! round-trip (see `check_frame`).
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| im_common_fuzz::check_frame(bytes));
