//! libFuzzer entry point of the `secondary` target (see tandem_fuzz::secondary).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::secondary::run(data));
