//! `record::decode` of `Accepted` and `PushBatch` on arbitrary bytes; whatever decodes must
//! re-encode and decode to the same record (see `check_record`).
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| im_common_fuzz::check_record(bytes));
