//! libFuzzer entry point of the `primary` target (see tandem_fuzz::primary).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: tandem_fuzz::keep_heap(),
    |data: &[u8]| tandem_fuzz::primary::run(data)
);
