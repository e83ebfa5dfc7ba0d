//! Bad input to the binary: one clear line on stderr, a non-zero exit, and
//! nothing touched (no image, metadata or socket created or changed, a
//! running agent undisturbed). And `tandem demo` passes end to end.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{
    Agent, READY_TIMEOUT, Site, file_digest, free_port, run_with_timeout, write_random_file,
};

const SIZE_BYTES: u64 = 64 << 20;

fn tandem(args: &[&str], dir: &Path) -> Output {
    run_with_timeout(
        Command::new(common::tandem_bin())
            .args(args)
            .current_dir(dir)
            .env("TANDEM_LOG", "info"),
        Duration::from_secs(20),
    )
}

/// Non-zero exit, nothing on stdout, exactly one non-empty line on stderr; returns it.
fn one_error_line(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: must exit non-zero; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: exactly one line on stderr expected, got:\n{stderr}"
    );
    assert!(
        stdout.trim().is_empty(),
        "{what}: stdout must be empty: {stdout}"
    );
    lines[0].to_string()
}

fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect()
}

fn sidecar(img: &Path, suffix: &str) -> PathBuf {
    let mut s = img.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[test]
fn second_agent_on_a_held_volume_is_refused_and_the_first_keeps_running() {
    let seed = common::seed("cli held volume");
    let site = Site::new();
    let img = site.path("held.img");
    write_random_file(&img, SIZE_BYTES, seed);
    let digest = file_digest(&img);
    let img_s = img.display().to_string();
    let certs = site.certs.display().to_string();
    let size = SIZE_BYTES.to_string();
    // Both agents use the default control socket, IMG.tandem.sock: the refused
    // one must not take it over.
    let control = sidecar(&img, ".tandem.sock");
    let listen1 = format!("127.0.0.1:{}", free_port());
    let mut first = Agent::spawn(
        "first-secondary",
        &[
            "secondary",
            "--volume",
            &img_s,
            "--size",
            &size,
            "--listen",
            &listen1,
            "--tls-dir",
            &certs,
        ]
        .map(String::from),
        site.path("first.log"),
        control.clone(),
    );
    first.wait_status("control socket", READY_TIMEOUT, |_| true);
    let meta = sidecar(&img, ".tandem-meta");
    let meta_digest = file_digest(&meta);

    let listen2 = format!("127.0.0.1:{}", free_port());
    let out = tandem(
        &[
            "secondary",
            "--volume",
            &img_s,
            "--size",
            &size,
            "--listen",
            &listen2,
            "--tls-dir",
            &certs,
        ],
        site.dir.path(),
    );
    let line = one_error_line(&out, "second secondary on a held volume");
    assert!(
        line.contains(&img_s) && line.contains("held"),
        "the message names the volume and the cause: {line}"
    );
    // The same for a primary on the held volume.
    let nbd = format!("127.0.0.1:{}", free_port());
    let out = tandem(
        &[
            "primary",
            "--volume",
            &img_s,
            "--size",
            &size,
            "--peer",
            &listen1,
            "--nbd",
            &nbd,
            "--mode",
            "sync",
            "--tls-dir",
            &certs,
        ],
        site.dir.path(),
    );
    let line = one_error_line(&out, "primary on a volume held by a secondary");
    assert!(line.contains("held"), "{line}");

    assert!(first.is_running(), "the first agent must keep running");
    let s = first
        .status()
        .expect("the first agent still answers on its control socket");
    assert_eq!(s["role"], "secondary", "{s}");
    assert_eq!(file_digest(&img), digest, "the held volume was modified");
    assert_eq!(
        file_digest(&meta),
        meta_digest,
        "the held metadata was modified"
    );
    first.stop();
}

#[test]
fn missing_volume_without_size_is_refused_and_nothing_is_created() {
    let site = Site::new();
    let img = site.path("absent.img");
    let img_s = img.display().to_string();
    let certs = site.certs.display().to_string();
    let before = listing(site.dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let out = tandem(
        &[
            "secondary",
            "--volume",
            &img_s,
            "--listen",
            &listen,
            "--tls-dir",
            &certs,
        ],
        site.dir.path(),
    );
    let line = one_error_line(&out, "missing volume without --size");
    assert!(
        line.contains(&img_s) && line.contains("--size"),
        "the message names the path and the fix: {line}"
    );
    let nbd = format!("127.0.0.1:{}", free_port());
    let out = tandem(
        &[
            "primary",
            "--volume",
            &img_s,
            "--peer",
            &listen,
            "--nbd",
            &nbd,
            "--mode",
            "sync",
            "--tls-dir",
            &certs,
        ],
        site.dir.path(),
    );
    let line = one_error_line(&out, "primary: missing volume without --size");
    assert!(line.contains(&img_s), "{line}");
    assert_eq!(
        listing(site.dir.path()),
        before,
        "nothing (image, metadata, socket) may be created"
    );
}

#[test]
fn malformed_config_file_is_refused_with_one_line() {
    let site = Site::new();
    let cfg = site.path("bad.toml");
    std::fs::write(
        &cfg,
        "[resource]\nname = \"r0\"\nmode = sync\n[nodes.alpha\naddress = 1\n",
    )
    .expect("write config");
    let before = listing(site.dir.path());
    let cfg_s = cfg.display().to_string();
    let out = tandem(
        &["secondary", "--config", &cfg_s, "--node", "alpha"],
        site.dir.path(),
    );
    let line = one_error_line(&out, "malformed --config");
    assert!(line.contains(&cfg_s), "the message names the file: {line}");
    assert_eq!(listing(site.dir.path()), before, "nothing may be created");
}

#[test]
fn status_against_a_missing_control_socket_fails_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nobody.sock");
    let sock_s = sock.display().to_string();
    for extra in [&[][..], &["--json"][..]] {
        let mut args = vec!["status", "--control", &sock_s];
        args.extend_from_slice(extra);
        let out = tandem(&args, dir.path());
        let line = one_error_line(&out, "status without an agent");
        assert!(
            line.contains(&sock_s),
            "the message names the socket: {line}"
        );
    }
    assert!(!sock.exists(), "status must not create the socket path");
}

#[test]
fn demo_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo_dir = dir.path().join("demo");
    let out = run_with_timeout(
        Command::new(common::tandem_bin())
            .args(["demo", "--seconds", "2", "--dir"])
            .arg(&demo_dir),
        Duration::from_secs(180),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tandem demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let identical = stdout.matches("identical").count();
    assert!(
        identical >= 2,
        "one 'identical' per mode expected:\n{stdout}"
    );
    assert!(!stdout.contains("DIFFERENT"), "{stdout}");
}

/// A resource file shaped like deploy/r0.toml (every path under `dir`, loopback
/// addresses), for start-up checks.
fn resource_file(dir: &Path, tls_dir: &Path, beta_volume: &str) -> PathBuf {
    let cfg = dir.join("r0.toml");
    let text = format!(
        r#"[resource]
name = "r0"
mode = "sync"
tls-dir = "{tls}"

[nodes.alpha]
address = "127.0.0.1:{pa}"
volume = "{d}/r0.img"
size = "100G"
meta = "{d}/r0.img.tandem-meta"
nbd = "127.0.0.1:{pn}"
control = "{d}/control.sock"

[nodes.beta]
address = "127.0.0.1:{pb}"
volume = "{beta_volume}"
meta = "{d}/beta.meta"
nbd = "127.0.0.1:{pn}"
control = "{d}/beta.sock"
"#,
        tls = tls_dir.display(),
        d = dir.display(),
        pa = free_port(),
        pb = free_port(),
        pn = free_port(),
    );
    std::fs::write(&cfg, text).expect("write resource file");
    cfg
}

#[test]
fn a_start_without_ca_pem_creates_no_image_and_no_metadata() {
    // Issue 15.8: the primary used to create a 100 GiB image and new metadata,
    // serve NBD, and only then exit on the missing ca.pem.
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    common::make_certs(&tls, &["alpha", "beta"]);
    std::fs::remove_file(tls.join("ca.pem")).expect("remove ca.pem");
    let cfg = resource_file(dir.path(), &tls, "/dev/null-tandem-absent");
    let cfg_s = cfg.display().to_string();
    let before = listing(dir.path());
    for role in ["primary", "secondary"] {
        let out = tandem(&[role, "--config", &cfg_s, "--node", "alpha"], dir.path());
        let line = one_error_line(&out, "missing ca.pem");
        assert!(
            line.contains("ca.pem") && line.contains("tandem certs"),
            "names the file and the fix: {line}"
        );
        assert_eq!(
            listing(dir.path()),
            before,
            "{role}: nothing may be created"
        );
    }
    // A certificate for another name is refused the same way, before anything.
    common::make_certs(&dir.path().join("other"), &["alpha", "beta"]);
    std::fs::copy(dir.path().join("other/ca.pem"), tls.join("ca.pem")).expect("copy");
    let before = listing(dir.path());
    let out = tandem(
        &["primary", "--config", &cfg_s, "--node", "alpha"],
        dir.path(),
    );
    let line = one_error_line(&out, "certificate of another CA");
    assert!(
        line.contains("alpha.pem") && line.contains("--ca"),
        "{line}"
    );
    assert_eq!(listing(dir.path()), before, "nothing may be created");
}

#[test]
fn a_missing_block_device_is_never_created_and_the_error_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    common::make_certs(&tls, &["alpha", "beta"]);
    let dev = "/dev/tandem-test-absent-disk";
    let cfg = resource_file(dir.path(), &tls, dev);
    let cfg_s = cfg.display().to_string();
    let before = listing(dir.path());
    for args in [
        vec!["secondary", "--config", &cfg_s, "--node", "beta"],
        // --size must not turn a device path into an image file under /dev.
        vec![
            "secondary",
            "--config",
            &cfg_s,
            "--node",
            "beta",
            "--size",
            "1G",
        ],
    ] {
        let out = tandem(&args, dir.path());
        let line = one_error_line(&out, "missing block device");
        assert!(
            line.contains(dev) && line.contains("block device") && !line.contains("--size"),
            "names the device, never suggests --size: {line}"
        );
        assert!(!Path::new(dev).exists(), "nothing created under /dev");
    }
    assert_eq!(listing(dir.path()), before);
    // A directory that does not exist: say which and how to make it.
    let out = tandem(
        &[
            "secondary",
            "--config",
            &cfg_s,
            "--node",
            "alpha",
            "--control",
            &dir.path().join("run/r0/control.sock").display().to_string(),
        ],
        dir.path(),
    );
    let line = one_error_line(&out, "missing control directory");
    assert!(line.contains("mkdir -p"), "{line}");
    assert_eq!(listing(dir.path()), before);
}

#[test]
fn a_start_that_fails_after_creating_the_image_removes_it() {
    // Everything the start-up checks can see is fine, but the metadata belongs
    // to a volume of another size: the agent fails after it created the image.
    let site = Site::new();
    let other = site.path("other.img");
    let meta = site.path("shared.meta");
    let certs = site.certs.display().to_string();
    let mut first = Agent::spawn(
        "meta-owner",
        &[
            "secondary",
            "--volume",
            &other.display().to_string(),
            "--size",
            "8M",
            "--meta",
            &meta.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--tls-dir",
            &certs,
            "--control",
            &site.path("owner.sock").display().to_string(),
        ]
        .map(String::from),
        site.path("owner.log"),
        site.path("owner.sock"),
    );
    first.wait_status("control socket", READY_TIMEOUT, |_| true);
    first.stop();
    let img = site.path("new.img");
    let out = tandem(
        &[
            "secondary",
            "--volume",
            &img.display().to_string(),
            "--size",
            "16M",
            "--meta",
            &meta.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--tls-dir",
            &certs,
            "--control",
            &site.path("new.sock").display().to_string(),
        ],
        site.dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("removed") && stderr.contains("new.img"),
        "says what it removed: {stderr}"
    );
    assert!(!img.exists(), "the image this start created is removed");
    assert!(meta.exists(), "the metadata it did not create is kept");
}

#[test]
fn files_are_created_private_whatever_the_umask_and_logs_have_no_colour_off_a_terminal() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let img = site.path("private.img");
    let control = site.path("private.sock");
    let log = site.path("private.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$@\"")
        .arg("sh")
        .arg(common::tandem_bin())
        .args(["secondary", "--volume"])
        .arg(&img)
        .args(["--size", "8M", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--tls-dir")
        .arg(&site.certs)
        .arg("--control")
        .arg(&control)
        .env("TANDEM_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(log_file)
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while common::status_of(&control).is_none() {
        assert!(std::time::Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) with our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().expect("wait");
    for p in [img.clone(), sidecar(&img, ".tandem-meta")] {
        let mode = std::fs::metadata(&p).expect("created").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is mode {mode:o}", p.display());
    }
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("INFO"), "the agent logged: {text}");
    assert!(
        !text.contains('\x1b'),
        "no ANSI colour in a log file: {text:?}"
    );
}

#[test]
fn a_node_certificate_signed_later_by_the_existing_ca_is_accepted_by_a_running_peer() {
    // Issue 12.6: `tandem certs --ca` signs a third node with the existing CA.
    let site = Site::with_names(&["alpha", "beta"]);
    let certs = site.certs.display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut beta = Agent::spawn(
        "beta",
        &[
            "secondary",
            "--name",
            "beta",
            "--peer-name",
            "gamma",
            "--volume",
            &site.path("beta.img").display().to_string(),
            "--size",
            "16M",
            "--listen",
            &listen,
            "--tls-dir",
            &certs,
            "--control",
            &site.path("beta.sock").display().to_string(),
        ]
        .map(String::from),
        site.path("beta.log"),
        site.path("beta.sock"),
    );
    beta.wait_status("control socket", READY_TIMEOUT, |_| true);
    // Signed after beta started, into a directory of its own.
    let gamma_dir = site.path("gamma-tls");
    let out = tandem(
        &[
            "certs",
            "--ca",
            &certs,
            "--name",
            "gamma",
            "--out",
            &gamma_dir.display().to_string(),
        ],
        site.dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gamma_dir.join("ca.pem").exists(), "ca.pem copied");
    let mut gamma = Agent::spawn(
        "gamma",
        &[
            "primary",
            "--name",
            "gamma",
            "--peer-name",
            "beta",
            "--volume",
            &site.path("gamma.img").display().to_string(),
            "--size",
            "16M",
            "--peer",
            &listen,
            "--nbd",
            &format!("127.0.0.1:{}", free_port()),
            "--tls-dir",
            &gamma_dir.display().to_string(),
            "--control",
            &site.path("gamma.sock").display().to_string(),
        ]
        .map(String::from),
        site.path("gamma.log"),
        site.path("gamma.sock"),
    );
    gamma.wait_status("connected and in sync", READY_TIMEOUT, |s| {
        s["peer"]["connection"] == "connected" && s["peer"]["disk_state"] == "UpToDate"
    });
    gamma.stop();
    beta.stop();
}

#[test]
fn status_all_asks_every_resource_and_a_silent_agent_times_out() {
    let site = Site::with_names(&["alpha", "beta"]);
    let dir = site.path("etc");
    std::fs::create_dir(&dir).expect("mkdir");
    let write = |name: &str| {
        let text = format!(
            "[resource]\nname = \"{name}\"\ntls-dir = \"{certs}\"\n\n[nodes.alpha]\naddress = \"127.0.0.1:{pa}\"\n\
             volume = \"{d}/{name}.img\"\nsize = \"16M\"\ncontrol = \"{d}/{name}.sock\"\n\n\
             [nodes.beta]\naddress = \"127.0.0.1:{pb}\"\nvolume = \"{d}/{name}-b.img\"\n",
            certs = site.certs.display(),
            d = site.dir.path().display(),
            pa = free_port(),
            pb = free_port(),
        );
        std::fs::write(dir.join(format!("{name}.toml")), text).expect("write");
        // The unit's env file names this host's node.
        std::fs::write(
            dir.join(format!("{name}.env")),
            "ROLE=secondary\nNODE=alpha\n",
        )
        .expect("env");
    };
    write("r0");
    write("r1");
    let r0 = dir.join("r0.toml").display().to_string();
    let mut agent = Agent::spawn(
        "r0-alpha",
        &["secondary", "--config", &r0, "--node", "alpha"].map(String::from),
        site.path("r0.log"),
        site.path("r0.sock"),
    );
    agent.wait_status("control socket", READY_TIMEOUT, |_| true);
    let dir_s = dir.display().to_string();
    let out = tandem(&["status", "--all", "--dir", &dir_s], site.dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "r1 is not running: {stdout}");
    assert!(stdout.contains("r0 role:secondary"), "{stdout}");
    assert!(
        stdout.contains("r1 (") && stdout.contains("not answering"),
        "{stdout}"
    );
    let out = tandem(
        &["status", "--all", "--dir", &dir_s, "--json"],
        site.dir.path(),
    );
    let docs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json array");
    assert_eq!(docs.as_array().map(Vec::len), Some(2), "{docs}");
    assert_eq!(docs[0]["ok"], true);
    assert_eq!(docs[0]["status"]["resource"], "r0");
    assert_eq!(docs[1]["ok"], false);
    agent.stop();

    // An agent that accepts and never answers: the client gives up in time.
    let silent = site.path("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).expect("bind");
    let start = std::time::Instant::now();
    let out = tandem(
        &[
            "status",
            "--control",
            &silent.display().to_string(),
            "--control-timeout",
            "1",
        ],
        site.dir.path(),
    );
    let line = one_error_line(&out, "silent agent");
    assert!(
        line.contains("did not answer") && line.contains("--control-timeout"),
        "{line}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}
