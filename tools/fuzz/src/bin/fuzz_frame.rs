//! libFuzzer entry point of the `frame` target (see tandem_fuzz::frame).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::frame::run(data));
