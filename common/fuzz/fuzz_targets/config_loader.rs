//! `Config::from_toml` on arbitrary UTF-8, and the same text as `IM__…=value` environment lines: no
//! panic, and every error names its key or file (see `check_config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        im_common_fuzz::check_config(text);
    }
});
