//! libFuzzer entry point of the `control` target (see tandem_fuzz::control).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::control::run(data));
