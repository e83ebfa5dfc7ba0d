//! The Pacemaker OCF resource agent `deploy/ocf/tandem`, driven the way
//! Pacemaker drives it: as a shell script with `OCF_RESKEY_*` parameters in
//! the environment, against the real `tandem` binary and a real resource file
//! (two nodes on loopback, mutual TLS with certificates from `tandem certs`).
//!
//! - `ocf_tester_passes_on_a_lone_uptodate_node` runs `ocf-tester` (Debian
//!   package resource-agents) through its whole sequence, promote and demote
//!   included, on node alpha of a pair whose peer beta is not running.
//!   alpha's volume was first made UpToDate by a brief `tandem primary`, so a
//!   lone promote is allowed (disk UpToDate, peer unreachable, no fencing hook).
//! - `agent_meta_data_validate_and_monitor_when_stopped` checks the
//!   meta-data (valid against the OCF DTD, every action and parameter), the
//!   exit codes of validate-all for broken parameters and of monitor/probe on
//!   a stopped resource.
//! - `agent_start_monitor_stop_as_secondary` runs start, monitor, a second
//!   start, a stopped (SIGSTOP) agent that no longer answers, and stop, with
//!   the control socket derived from the volume path.
//!
//! Whatever happens, the node agent the script started in the background is
//! killed (by the pid in its pidfile) when a test ends.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Agent, READY_TIMEOUT, Site, free_port, run_with_timeout, tandem_bin};

const SIZE_BYTES: u64 = 16 << 20;
/// Where Debian's resource-agents package puts the OCF tree and ocf-tester.
const OCF_ROOT: &str = "/usr/lib/ocf";
const OCF_TESTER: &str = "/usr/sbin/ocf-tester";
/// ra-api-1.dtd, against which ocf-tester validates meta-data.
const OCF_DTD_DIR: &str = "/usr/share/resource-agents";

/// OCF exit codes.
const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_ERR_INSTALLED: i32 = 5;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;

/// A copy of the resource agent in a world-readable directory: ocf-tester
/// runs `meta-data` as user nobody, who cannot enter the tests' 0700
/// temporary directories (or, possibly, the checkout).
struct AgentScript {
    dir: tempfile::TempDir,
}

impl AgentScript {
    fn install() -> AgentScript {
        let dir = tempfile::Builder::new()
            .prefix("tandem-ocf-agent-")
            .tempdir()
            .expect("tempdir for the agent script");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod 0755");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ocf/tandem");
        let dst = dir.path().join("tandem");
        fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod 0755");
        AgentScript { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("tandem")
    }
}

/// Kills the node agent named by a pidfile when dropped, if it is still a
/// tandem process: the script starts it in the background, outside the
/// test's process tree, so nothing else would.
struct PidfileGuard {
    pidfile: PathBuf,
}

impl PidfileGuard {
    /// The pid in the pidfile if that process is alive (not a zombie) and runs tandem.
    fn live_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(") ")?.1.split(' ').next()?;
        if state == "Z" {
            return None;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv0 = cmdline.split(|b| *b == 0).next()?;
        (argv0 == tandem_bin().as_bytes()).then_some(pid)
    }
}

impl Drop for PidfileGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.live_pid() {
            eprintln!("killing node agent pid {pid} left running by the test");
            // SAFETY: kill(2) takes plain integers; the pid was checked to be a tandem process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.live_pid().is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A resource file for nodes alpha and beta on loopback, their volumes in the site.
struct Resource {
    config: PathBuf,
    alpha_img: PathBuf,
    /// alpha's control socket; None lets it default to VOLUME.tandem.sock.
    alpha_control: Option<PathBuf>,
}

fn write_resource(site: &Site, alpha_control: Option<PathBuf>) -> Resource {
    let config = site.path("r0.toml");
    let alpha_img = site.path("alpha.img");
    let beta_img = site.path("beta.img");
    let control_line = match &alpha_control {
        Some(p) => format!("control = \"{}\"\n", p.display()),
        None => String::new(),
    };
    let text = format!(
        r#"# written by tests/e2e_ocf.rs
[resource]
name = "r0"
mode = "sync"
tls-dir = "{certs}"
# The peer never runs in these tests: keep waits for it short.
drain-timeout-ms = 2000
connect-timeout-ms = 1000

[nodes.alpha]
address = "127.0.0.1:{alpha_port}"
volume = "{alpha_img}"
size = "{size}"
nbd = "127.0.0.1:{nbd_port}"
{control_line}
[nodes.beta]
address = "127.0.0.1:{beta_port}"
volume = "{beta_img}"
size = "{size}"
nbd = "127.0.0.1:{nbd_port}"
"#,
        certs = site.certs.display(),
        alpha_port = free_port(),
        beta_port = free_port(),
        nbd_port = free_port(),
        alpha_img = alpha_img.display(),
        beta_img = beta_img.display(),
        size = SIZE_BYTES,
    );
    fs::write(&config, text).expect("write resource file");
    Resource {
        config,
        alpha_img,
        alpha_control,
    }
}

/// Run `tandem primary` for alpha until it reports its disk UpToDate, then
/// SIGTERM it: the metadata now says UpToDate, so alpha may later be promoted
/// alone.
fn make_alpha_uptodate(site: &Site, res: &Resource) {
    let control = res
        .alpha_control
        .clone()
        .expect("this setup names alpha's control socket");
    fs::create_dir_all(control.parent().expect("socket dir")).expect("mkdir socket dir");
    let args: Vec<String> = vec![
        "primary".into(),
        "--config".into(),
        res.config.display().to_string(),
        "--node".into(),
        "alpha".into(),
    ];
    let mut primary = Agent::spawn("alpha-init", &args, site.path("alpha-init.log"), control);
    primary.wait_status("disk UpToDate as primary", READY_TIMEOUT, |s| {
        s["role"] == "primary" && s["disk_state"] == "UpToDate"
    });
    primary.stop();
}

/// The environment Pacemaker (or ocf-tester) gives a resource agent.
fn ocf_env<'a>(cmd: &'a mut Command, params: &[(&str, String)]) -> &'a mut Command {
    cmd.env("OCF_ROOT", OCF_ROOT)
        .env("OCF_RESOURCE_INSTANCE", "r0")
        .env("TANDEM_LOG", "info");
    for (k, v) in params {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
    cmd
}

/// Run one action of the agent with `params` (and extra environment `env`).
fn action(agent: &Path, act: &str, params: &[(&str, String)], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(agent);
    cmd.arg(act);
    ocf_env(&mut cmd, params);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

/// Run an action and require exit code `want`; the message names the step.
fn expect_rc(
    agent: &Path,
    act: &str,
    params: &[(&str, String)],
    env: &[(&str, &str)],
    want: i32,
    step: &str,
) -> Output {
    let out = action(agent, act, params, env);
    assert_eq!(
        out.status.code(),
        Some(want),
        "{step}: `{act}` must exit {want}, got {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A regular (not probe) monitor has a non-zero interval.
const MONITOR: &[(&str, &str)] = &[("OCF_RESKEY_CRM_meta_interval", "20000")];
const PROBE: &[(&str, &str)] = &[("OCF_RESKEY_CRM_meta_interval", "0")];

#[test]
fn ocf_tester_passes_on_a_lone_uptodate_node() {
    let site = Site::with_names(&["alpha", "beta"]);
    // A socket directory that does not exist yet: start must create it.
    let res = write_resource(&site, Some(site.path("run/r0/alpha.sock")));
    make_alpha_uptodate(&site, &res);
    let agent = AgentScript::install();
    let pidfile = site.path("r0.pid");
    let log = site.path("r0-agent.log");
    let guard = PidfileGuard {
        pidfile: pidfile.clone(),
    };

    let mut cmd = Command::new(OCF_TESTER);
    cmd.env("OCF_ROOT", OCF_ROOT)
        .env("TANDEM_LOG", "info")
        .arg("-v")
        .arg("-n")
        .arg("r0");
    for (k, v) in [
        ("config", res.config.display().to_string()),
        ("node", "alpha".to_string()),
        ("binary", tandem_bin().to_string()),
        ("pidfile", pidfile.display().to_string()),
        ("log", log.display().to_string()),
        ("demote_timeout", "10".to_string()),
    ] {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    cmd.arg(agent.path());
    let out = run_with_timeout(&mut cmd, Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("passed all tests"),
        "ocf-tester failed with {}\nstdout:\n{stdout}\nstderr:\n{}\n----- node agent log {} -----\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log.display(),
        fs::read_to_string(&log).unwrap_or_default()
    );
    // ocf-tester ends with stop: nothing may be left running.
    assert_eq!(
        guard.live_pid(),
        None,
        "the node agent still runs after ocf-tester's final stop"
    );
}

#[test]
fn agent_meta_data_validate_and_monitor_when_stopped() {
    let site = Site::with_names(&["alpha", "beta"]);
    let res = write_resource(&site, Some(site.path("alpha.sock")));
    let agent = AgentScript::install();
    let agent = agent.path();
    let pidfile = site.path("r0.pid");
    let _guard = PidfileGuard {
        pidfile: pidfile.clone(),
    };
    let params = vec![
        ("config", res.config.display().to_string()),
        ("node", "alpha".to_string()),
        ("binary", tandem_bin().to_string()),
        ("pidfile", pidfile.display().to_string()),
        ("log", site.path("r0-agent.log").display().to_string()),
    ];

    // meta-data: valid against the DTD ocf-tester and Pacemaker use.
    let out = expect_rc(&agent, "meta-data", &[], &[], OCF_SUCCESS, "meta-data");
    let xml = String::from_utf8(out.stdout).expect("meta-data is UTF-8");
    let xml_file = site.path("meta-data.xml");
    fs::write(&xml_file, &xml).expect("write meta-data");
    let lint = run_with_timeout(
        Command::new("xmllint")
            .arg("--noout")
            .arg("--dtdvalid")
            .arg(format!("{OCF_DTD_DIR}/ra-api-1.dtd"))
            .arg(&xml_file),
        Duration::from_secs(30),
    );
    assert!(
        lint.status.success(),
        "meta-data is not valid against {OCF_DTD_DIR}/ra-api-1.dtd: {}\n{xml}",
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(
        xml.contains("<resource-agent name=\"tandem\"") && xml.contains("<version>1.1</version>"),
        "meta-data must name the agent and OCF version 1.1:\n{xml}"
    );
    for p in [
        "config",
        "node",
        "control",
        "binary",
        "log",
        "pidfile",
        "start_role",
        "demote_timeout",
        "force_promote",
    ] {
        assert!(
            xml.contains(&format!("<parameter name=\"{p}\"")),
            "meta-data lacks parameter {p}:\n{xml}"
        );
    }
    assert!(
        xml.contains("<parameter name=\"config\" required=\"1\""),
        "config must be required:\n{xml}"
    );
    let actions: Vec<&str> = xml
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("<action "))
        .collect();
    let attr = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_string())
    };
    for a in [
        "start",
        "stop",
        "promote",
        "demote",
        "notify",
        "monitor",
        "validate-all",
        "meta-data",
    ] {
        assert!(
            actions
                .iter()
                .any(|l| attr(l, "name").as_deref() == Some(a) && attr(l, "timeout").is_some()),
            "meta-data lacks action {a} with a timeout:\n{xml}"
        );
    }
    let monitor_interval = |role: &str| -> String {
        actions
            .iter()
            .find(|l| {
                attr(l, "name").as_deref() == Some("monitor")
                    && attr(l, "role").as_deref() == Some(role)
            })
            .and_then(|l| attr(l, "interval"))
            .unwrap_or_else(|| panic!("meta-data lacks a monitor action for role {role}:\n{xml}"))
    };
    let promoted = monitor_interval("Promoted");
    let unpromoted = monitor_interval("Unpromoted");
    assert_ne!(
        promoted, unpromoted,
        "Pacemaker needs different intervals for the two monitor roles"
    );

    // validate-all: good parameters pass; each broken one names its class.
    expect_rc(
        &agent,
        "validate-all",
        &params,
        &[],
        OCF_SUCCESS,
        "good parameters",
    );
    let with = |key: &'static str, value: String| -> Vec<(&'static str, String)> {
        params
            .iter()
            .filter(|(k, _)| *k != key)
            .cloned()
            .chain([(key, value)])
            .collect()
    };
    let missing_config = site.path("no-such.toml").display().to_string();
    let out = expect_rc(
        &agent,
        "validate-all",
        &with("config", missing_config.clone()),
        &[],
        OCF_ERR_CONFIGURED,
        "missing resource file",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&missing_config),
        "the error must name the missing file: {stderr}"
    );
    expect_rc(
        &agent,
        "validate-all",
        &with("binary", site.path("no-such-tandem").display().to_string()),
        &[],
        OCF_ERR_INSTALLED,
        "missing binary",
    );
    expect_rc(
        &agent,
        "validate-all",
        &with("node", "gamma".into()),
        &[],
        OCF_ERR_CONFIGURED,
        "node not in the resource file",
    );
    expect_rc(
        &agent,
        "validate-all",
        &with("start_role", "tertiary".into()),
        &[],
        OCF_ERR_CONFIGURED,
        "bad start_role",
    );
    expect_rc(
        &agent,
        "validate-all",
        &with("demote_timeout", "soon".into()),
        &[],
        OCF_ERR_CONFIGURED,
        "bad demote_timeout",
    );

    // Nothing started: monitor and probe say "not running"; so does a probe
    // whose resource file is missing (a node that was never set up).
    expect_rc(
        &agent,
        "monitor",
        &params,
        MONITOR,
        OCF_NOT_RUNNING,
        "monitor, stopped",
    );
    expect_rc(
        &agent,
        "monitor",
        &params,
        PROBE,
        OCF_NOT_RUNNING,
        "probe, stopped",
    );
    expect_rc(
        &agent,
        "monitor",
        &with("config", missing_config),
        PROBE,
        OCF_NOT_RUNNING,
        "probe, no resource file",
    );
    // Stopping a stopped resource succeeds; unknown actions are unimplemented (3).
    expect_rc(&agent, "stop", &params, &[], OCF_SUCCESS, "stop, stopped");
    expect_rc(&agent, "reload", &params, &[], 3, "reload");
}

#[test]
fn agent_start_monitor_stop_as_secondary() {
    let site = Site::with_names(&["alpha", "beta"]);
    // No control key: the agent derives VOLUME.tandem.sock, like the binary.
    let res = write_resource(&site, None);
    let derived_control = {
        let mut s = res.alpha_img.clone().into_os_string();
        s.push(".tandem.sock");
        PathBuf::from(s)
    };
    let agent = AgentScript::install();
    let agent = agent.path();
    let pidfile = site.path("run/r0.pid");
    let log = site.path("log/r0-agent.log");
    let guard = PidfileGuard {
        pidfile: pidfile.clone(),
    };
    let params = vec![
        ("config", res.config.display().to_string()),
        ("node", "alpha".to_string()),
        ("binary", tandem_bin().to_string()),
        ("pidfile", pidfile.display().to_string()),
        ("log", log.display().to_string()),
    ];
    let show_log = || fs::read_to_string(&log).unwrap_or_default();

    expect_rc(&agent, "start", &params, &[], OCF_SUCCESS, "start");
    let pid = guard
        .live_pid()
        .unwrap_or_else(|| panic!("no live node agent after start; log:\n{}", show_log()));
    let status = common::status_of(&derived_control).unwrap_or_else(|| {
        panic!(
            "the node agent does not answer on the derived socket {}; log:\n{}",
            derived_control.display(),
            show_log()
        )
    });
    assert_eq!(status["role"], "secondary", "{status}");
    assert_eq!(status["node"], "alpha", "{status}");

    expect_rc(
        &agent,
        "monitor",
        &params,
        MONITOR,
        OCF_SUCCESS,
        "monitor, secondary",
    );
    expect_rc(
        &agent,
        "monitor",
        &params,
        PROBE,
        OCF_SUCCESS,
        "probe, secondary",
    );
    // Depth 10 (Pacemaker passes it as OCF_RESKEY_OCF_CHECK_LEVEL) also
    // reports the absent peer; depth 0 does not.
    let deep = expect_rc(
        &agent,
        "monitor",
        &params,
        &[
            ("OCF_RESKEY_CRM_meta_interval", "20000"),
            ("OCF_RESKEY_OCF_CHECK_LEVEL", "10"),
        ],
        OCF_SUCCESS,
        "monitor depth 10, secondary",
    );
    let deep_err = String::from_utf8_lossy(&deep.stderr);
    assert!(
        deep_err.contains("peer connection is 'connecting'"),
        "depth 10 must log the unconnected peer: {deep_err}"
    );
    let shallow = expect_rc(
        &agent,
        "monitor",
        &params,
        MONITOR,
        OCF_SUCCESS,
        "monitor depth 0, secondary",
    );
    assert!(
        !String::from_utf8_lossy(&shallow.stderr).contains("peer connection is"),
        "depth 0 must not run the depth 10 checks"
    );
    expect_rc(
        &agent,
        "start",
        &params,
        &[],
        OCF_SUCCESS,
        "start, already running",
    );
    assert_eq!(
        guard.live_pid(),
        Some(pid),
        "a second start must not restart the agent"
    );
    expect_rc(
        &agent,
        "notify",
        &params,
        &[
            ("OCF_RESKEY_CRM_meta_notify_type", "pre"),
            ("OCF_RESKEY_CRM_meta_notify_operation", "promote"),
            ("OCF_RESKEY_CRM_meta_notify_promote_uname", "beta"),
        ],
        OCF_SUCCESS,
        "notify pre-promote",
    );

    // A process that runs but does not answer (stopped): a generic failure,
    // not "not running".
    // SAFETY: kill(2) takes plain integers; pid is the live tandem agent checked above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let out = action(&agent, "monitor", &params, MONITOR);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert_eq!(
        out.status.code(),
        Some(OCF_ERR_GENERIC),
        "monitor of an agent that does not answer must exit 1; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not answer"),
        "the reason must say the socket does not answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    expect_rc(
        &agent,
        "monitor",
        &params,
        MONITOR,
        OCF_SUCCESS,
        "monitor after SIGCONT",
    );

    expect_rc(&agent, "stop", &params, &[], OCF_SUCCESS, "stop");
    assert_eq!(guard.live_pid(), None, "the node agent survived stop");
    assert!(!pidfile.exists(), "stop must remove the pidfile");
    assert!(
        show_log().contains("started by the OCF agent as secondary"),
        "the agent's log must hold the start marker:\n{}",
        show_log()
    );
    expect_rc(
        &agent,
        "monitor",
        &params,
        MONITOR,
        OCF_NOT_RUNNING,
        "monitor after stop",
    );
    expect_rc(
        &agent,
        "stop",
        &params,
        &[],
        OCF_SUCCESS,
        "stop, already stopped",
    );
}
