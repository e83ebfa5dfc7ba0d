//! libFuzzer entry point of the `nbd_option` target (see tandem_fuzz::nbd_option).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::nbd_option::run(data));
