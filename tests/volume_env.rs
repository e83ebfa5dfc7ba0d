//! `TANDEM_IO_ENGINE` overrides `EngineChoice::Auto`. One test in its own binary,
//! because it changes the process environment.

use tandem::volume::{ENGINE_ENV_VAR, EngineChoice, OpenOptions, Volume, VolumeError};

fn set_env(value: &str) {
    // SAFETY: this test binary has a single test, and no other thread reads or writes
    // the environment while it runs.
    unsafe { std::env::set_var(ENGINE_ENV_VAR, value) }
}

#[test]
fn environment_variable_overrides_auto_but_not_an_explicit_choice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env.img");
    let open = |engine| {
        Volume::open(
            &path,
            &OpenOptions {
                create_size_bytes: Some(1 << 20),
                direct: false,
                engine,
            },
        )
    };

    set_env("threads");
    assert_eq!(open(EngineChoice::Auto).unwrap().engine_name(), "threads");
    assert_eq!(open(EngineChoice::Uring).unwrap().engine_name(), "io_uring");

    set_env("uring");
    assert_eq!(open(EngineChoice::Auto).unwrap().engine_name(), "io_uring");
    assert_eq!(
        open(EngineChoice::Threads).unwrap().engine_name(),
        "threads"
    );

    set_env("auto");
    assert_eq!(
        open(EngineChoice::Auto).unwrap().engine_name(),
        "io_uring",
        "io_uring works on this machine"
    );

    set_env("epoll");
    let err = open(EngineChoice::Auto).unwrap_err();
    assert!(
        matches!(&err, VolumeError::UnknownEngine { value } if value == "epoll"),
        "{err:?}"
    );
    assert!(err.to_string().contains("TANDEM_IO_ENGINE=epoll"), "{err}");
}
