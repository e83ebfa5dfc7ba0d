//! Power-loss trials with real processes (issue 9, item 3).
//!
//! Each node (alpha, first primary; beta, first secondary) keeps its volume
//! image and metadata on a [`disk::PowerDisk`]: ext4 on a loop device over an
//! nbdkit export whose cache filter holds writes until a flush reaches it.
//! A trial starts a fresh pair, puts ext4 on the primary's export with fio
//! writing crc32c-verifiable files (an application on the primary node), cuts
//! the power of the primary, the secondary or both at a seeded random instant,
//! restores it, restarts the agents as an administrator would, and checks:
//!
//! - each raw copy right after its power returns (before its agent restarts)
//!   mounts, fscks clean, and holds every file fsync'd before the cut (a
//!   primary: its own flushes; a secondary in sync mode: G1);
//! - after a primary cut the promoted secondary (`tandem promote`) mounts
//!   through its export, `e2fsck -fn` is clean, fsync'd files verify (sync: G1);
//! - the pair converges (status in sync), both agents stop cleanly, the images
//!   are `cmp`-identical (G3), the final image fscks clean and verifies;
//! - no agent panics, and each restarts from its persisted metadata.
//!
//! Every random choice comes from the trial's seed, printed at the start and in
//! every finding. A failed check is a [`Finding`] with its evidence (differing
//! blocks and the files that own them, fsck output, fio output, agent logs).

pub mod disk;
pub mod fsops;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Agent, TestRng, free_port, make_certs, primary_in_sync, run_with_timeout};
use disk::PowerDisk;
use fsops::{FioJob, Mounted, Workload, describe};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
    Both,
    /// The secondary goes away (kill -9) while the application writes on, comes
    /// back, and loses power in the middle of the resync that follows (issue 10:
    /// it must come back consistent).
    SecondaryMidResync,
}

impl Role {
    pub fn parse(s: &str) -> Role {
        match s {
            "primary" => Role::Primary,
            "secondary" => Role::Secondary,
            "both" => Role::Both,
            "secondary-resync" => Role::SecondaryMidResync,
            _ => panic!("unknown role {s:?}: primary, secondary, both or secondary-resync"),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Both => "both",
            Role::SecondaryMidResync => "secondary-resync",
        })
    }
}

#[derive(Clone, Debug)]
pub struct TrialConfig {
    pub role: Role,
    /// "sync" or "async".
    pub mode: String,
    pub volume_bytes: u64,
    pub al_extents: u32,
    /// `--al-extent-size` of both agents at their first start (None: the
    /// agent's default) and at every later start (None: the same): a change
    /// across the cut checks that recovery uses the size the log was written with.
    pub al_extent_size: Option<String>,
    pub al_extent_size_after: Option<String>,
    pub seed: u64,
    /// The cut comes this long after the workload started: uniform in the range.
    pub cut_after_ms: (u64, u64),
    /// How long the pair may take to converge after a restart.
    pub converge_timeout: Duration,
    /// CI only: after `cut_after_ms`, also wait until an O_DIRECT spread job has
    /// run for a seeded 0.5-1.5 s (at most 30 s more), so that the cut falls where
    /// unflushed writes sit in extents that may have retired. The campaign keeps
    /// plain random instants.
    pub cut_in_spread: bool,
}

impl TrialConfig {
    /// The command that replays this trial.
    pub fn replay(&self) -> String {
        format!(
            "POWERLOSS_TRIAL_SEED={} POWERLOSS_ROLES={} POWERLOSS_MODES={} POWERLOSS_SIZE={} POWERLOSS_AL_EXTENTS={}{}{} POWERLOSS_CUT_MS={}..{} POWERLOSS_CUT_IN_SPREAD={} tools/powerloss/run.sh",
            self.seed,
            self.role,
            self.mode,
            self.volume_bytes,
            self.al_extents,
            self.al_extent_size
                .as_ref()
                .map(|s| format!(" POWERLOSS_AL_EXTENT_SIZE={s}"))
                .unwrap_or_default(),
            self.al_extent_size_after
                .as_ref()
                .map(|s| format!(" POWERLOSS_AL_EXTENT_SIZE_AFTER={s}"))
                .unwrap_or_default(),
            self.cut_after_ms.0,
            self.cut_after_ms.1,
            u8::from(self.cut_in_spread)
        )
    }
}

/// One failed check of a trial, with its evidence.
#[derive(Clone, Debug)]
pub struct Finding {
    pub check: &'static str,
    pub detail: String,
}

#[derive(Debug)]
pub struct TrialReport {
    pub config: TrialConfig,
    pub findings: Vec<Finding>,
    pub cut_after_ms: u64,
    pub fsynced_jobs: usize,
    pub elapsed: Duration,
    /// Only with POWERLOSS_KEEP=1: the trial's directory, left for inspection.
    pub kept_dir: Option<PathBuf>,
}

impl TrialReport {
    pub fn json(&self) -> String {
        serde_json::json!({
            "role": self.config.role.to_string(),
            "mode": self.config.mode,
            "seed": self.config.seed,
            "volume_bytes": self.config.volume_bytes,
            "al_extents": self.config.al_extents,
            "al_extent_size": self.config.al_extent_size,
            "al_extent_size_after": self.config.al_extent_size_after,
            "cut_after_ms": self.cut_after_ms,
            "fsynced_jobs": self.fsynced_jobs,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "checks_failed": self.findings.iter().map(|f| f.check).collect::<Vec<_>>(),
            "findings": self.findings.iter().map(|f| serde_json::json!({"check": f.check, "detail": f.detail})).collect::<Vec<_>>(),
            "replay": self.config.replay(),
        })
        .to_string()
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "trial role={} mode={} seed={} size={} al_extents={}: cut after {} ms, {} fsync'd files, {:.1} s: ",
            self.config.role,
            self.config.mode,
            self.config.seed,
            self.config.volume_bytes,
            self.config.al_extents,
            self.cut_after_ms,
            self.fsynced_jobs,
            self.elapsed.as_secs_f64()
        );
        if self.findings.is_empty() {
            s += "all checks passed";
        } else {
            s += &format!("{} check(s) FAILED", self.findings.len());
            for f in &self.findings {
                s += &format!("\n  [{}] {}", f.check, f.detail.replace('\n', "\n      "));
            }
            s += &format!("\n  replay: {}", self.config.replay());
        }
        if let Some(d) = &self.kept_dir {
            s += &format!("\n  files kept in {}", d.display());
        }
        s
    }
}

const NODES: [&str; 2] = ["alpha", "beta"];
const A: usize = 0;
const B: usize = 1;

/// One node: its power-cut disk and (while running) its agent.
struct Node {
    // The agent goes before the disk it runs on.
    agent: Option<Agent>,
    disk: PowerDisk,
    name: &'static str,
    control: PathBuf,
    log: PathBuf,
    starts: u32,
}

impl Node {
    fn volume(&self) -> PathBuf {
        self.disk.mnt.join("vol.img")
    }
}

/// Everything of one trial; fields drop in order: agents and mounts before disks,
/// disks before the directory.
struct Trial {
    client: Option<Mounted>,
    workload: Option<Workload>,
    nodes: Vec<Node>,
    cfg: TrialConfig,
    config_file: PathBuf,
    nbd_ports: [u16; 2],
    findings: Vec<Finding>,
    rng: TestRng,
    dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

fn size_of_node_disk(volume_bytes: u64) -> u64 {
    // The secondary's image ends up fully allocated (unwritten extents) by the
    // initial sync: the node filesystem must hold the whole volume plus ext4's
    // own metadata, the agent's metadata file, the secondary's redo journal
    // (1 GiB by default) and, once promoted in async mode, the primary's spill
    // log (1 GiB by default, preallocated). Without room for the spill log an
    // async promotion is refused (the campaign at seed 1132 found every async
    // primary and both cut failing its promote check that way).
    volume_bytes + volume_bytes / 8 + (3 << 30)
}

/// Run one trial end to end; the report lists every failed check.
pub fn run_trial(cfg: &TrialConfig, certs: &Path) -> TrialReport {
    let start = Instant::now();
    eprintln!(
        "powerloss: trial role={} mode={} size={} seed={} (replay: {})",
        cfg.role,
        cfg.mode,
        cfg.volume_bytes,
        cfg.seed,
        cfg.replay()
    );
    let tmp = tempfile::Builder::new()
        .prefix("tandem-powerloss-")
        .tempdir()
        .expect("trial tempdir");
    let dir = tmp.path().to_owned();
    let mut rng = TestRng::new(cfg.seed);
    let cut_after_ms = cfg.cut_after_ms.0 + rng.below(cfg.cut_after_ms.1 - cfg.cut_after_ms.0 + 1);
    let nodes: Vec<Node> = NODES
        .iter()
        .map(|&name| Node {
            agent: None,
            disk: PowerDisk::create(&dir, name, size_of_node_disk(cfg.volume_bytes)),
            name,
            control: dir.join(format!("{name}.sock")),
            log: dir.join(format!("{name}.log")),
            starts: 0,
        })
        .collect();
    let nbd_ports = [free_port(), free_port()];
    let config_file = dir.join("r0.toml");
    let mut text = format!(
        "[resource]\nname = \"r0\"\nmode = \"{}\"\ntls-dir = \"{}\"\npeer-timeout-ms = 6000\nheartbeat-interval-ms = 300\ndrain-timeout-ms = 60000\n",
        cfg.mode,
        certs.display()
    );
    for (i, n) in nodes.iter().enumerate() {
        text += &format!(
            "\n[nodes.{}]\naddress = \"127.0.0.1:{}\"\nvolume = \"{}\"\nmeta = \"{}\"\nsize = {}\nnbd = \"127.0.0.1:{}\"\ncontrol = \"{}\"\n",
            n.name,
            free_port(),
            n.volume().display(),
            n.disk.mnt.join("vol.meta").display(),
            cfg.volume_bytes,
            nbd_ports[i],
            n.control.display()
        );
    }
    fs::write(&config_file, text).expect("write resource file");
    let mut t = Trial {
        client: None,
        workload: None,
        nodes,
        cfg: cfg.clone(),
        config_file,
        nbd_ports,
        findings: Vec::new(),
        rng,
        dir,
        tmp: Some(tmp),
    };
    let fsynced = t.run(cut_after_ms);
    t.scan_logs_for_panics();
    let kept_dir = if std::env::var("POWERLOSS_KEEP").is_ok_and(|v| v == "1") {
        t.stop_everything_for_keep();
        t.tmp.take().map(|d| d.keep())
    } else {
        None
    };
    let report = TrialReport {
        config: cfg.clone(),
        findings: std::mem::take(&mut t.findings),
        cut_after_ms,
        fsynced_jobs: fsynced,
        elapsed: start.elapsed(),
        kept_dir,
    };
    drop(t);
    eprintln!("powerloss: {}", report.summary());
    report
}

/// Outcome of a step that may end the trial early.
type Step = Result<(), ()>;

impl Trial {
    fn find(&mut self, check: &'static str, detail: impl Into<String>) {
        let detail = format!("{} (seed {})", detail.into(), self.cfg.seed);
        eprintln!("powerloss: FINDING [{check}] {detail}");
        self.findings.push(Finding { check, detail });
    }

    fn log_tail(&self, node: usize, lines: usize) -> String {
        let text = fs::read_to_string(&self.nodes[node].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "last {} lines of {}:\n{}",
            all.len() - from,
            self.nodes[node].log.display(),
            all[from..].join("\n")
        )
    }

    /// Start `node`'s agent in `role` and wait until its control socket answers.
    fn start_agent(&mut self, node: usize, role: &str) -> Step {
        let n = &mut self.nodes[node];
        assert!(n.agent.is_none(), "{} already runs", n.name);
        let args: Vec<String> = vec![
            role.into(),
            "--config".into(),
            self.config_file.display().to_string(),
            "--node".into(),
            n.name.into(),
            "--al-extents".into(),
            self.cfg.al_extents.to_string(),
            "--resync-rate".into(),
            "0".into(),
        ];
        let mut args = args;
        let extent_size = match n.starts {
            0 => self.cfg.al_extent_size.as_ref(),
            _ => self
                .cfg
                .al_extent_size_after
                .as_ref()
                .or(self.cfg.al_extent_size.as_ref()),
        };
        if let Some(size) = extent_size {
            args.extend(["--al-extent-size".into(), size.clone()]);
        }
        n.starts += 1;
        let mut agent = Agent::spawn(n.name, &args, n.log.clone(), n.control.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if agent.status().is_some() {
                break;
            }
            if !agent.is_running() || Instant::now() > deadline {
                let name = n.name;
                let starts = n.starts;
                drop(agent);
                let tail = self.log_tail(node, 30);
                self.find(
                    "restart",
                    format!("{name} (start {starts}, as {role}) did not come up: {tail}"),
                );
                return Err(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.nodes[node].agent = Some(agent);
        Ok(())
    }

    fn status(&self, node: usize) -> Option<serde_json::Value> {
        self.nodes[node].agent.as_ref().and_then(|a| a.status())
    }

    /// Wait until `primary` is connected and in sync and the other node is an
    /// UpToDate secondary of the same generation.
    fn wait_converged(&mut self, primary: usize, why: &str) -> Step {
        let deadline = Instant::now() + self.cfg.converge_timeout;
        loop {
            let p = self.status(primary);
            let s = self.status(1 - primary);
            if let (Some(p), Some(s)) = (&p, &s)
                && p["role"] == "primary"
                && primary_in_sync(p)
                && s["role"] == "secondary"
                && s["disk_state"] == "UpToDate"
                && s["peer"]["connection"] == "connected"
                && s["generation"] == p["generation"]
            {
                return Ok(());
            }
            for node in [A, B] {
                let running = self.nodes[node]
                    .agent
                    .as_mut()
                    .is_some_and(|a| a.is_running());
                if !running {
                    let tail = self.log_tail(node, 30);
                    self.find(
                        "converge",
                        format!("{}: {} exited; {tail}", why, self.nodes[node].name),
                    );
                    self.nodes[node].agent = None;
                    return Err(());
                }
            }
            if Instant::now() > deadline {
                let detail = format!(
                    "{why}: not in sync within {:?}; primary {} status: {}; secondary {} status: {}",
                    self.cfg.converge_timeout,
                    self.nodes[primary].name,
                    p.map(|v| v.to_string()).unwrap_or_else(|| "none".into()),
                    self.nodes[1 - primary].name,
                    s.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
                );
                self.find("converge", detail);
                return Err(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `tandem <cmd> --control SOCK args`: (success, output).
    fn ctl(&self, node: usize, cmd: &str, args: &[&str]) -> (bool, String) {
        let out = run_with_timeout(
            Command::new(crate::common::tandem_bin())
                .arg(cmd)
                .arg("--control")
                .arg(&self.nodes[node].control)
                .args(args),
            Duration::from_secs(120),
        );
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Set up the pair and the application, cut, restore, check. Returns how
    /// many fsync'd files the application had completed before the cut.
    fn run(&mut self, cut_after_ms: u64) -> usize {
        // The pair, and ext4 + fio on alpha's export.
        if self.start_agent(B, "secondary").is_err() || self.start_agent(A, "primary").is_err() {
            return 0;
        }
        if self.wait_converged(A, "initial sync").is_err() {
            return 0;
        }
        let uri = format!("nbd://127.0.0.1:{}", self.nbd_ports[A]);
        let mut client = Mounted::attach_export(&self.dir, "app", &uri);
        client.mkfs();
        client
            .mount()
            .expect("mount the fresh filesystem on the export");
        Workload::prepare(&client.mnt);
        let workload = Workload::start(&client.mnt, self.cfg.volume_bytes, self.rng.next_u64());
        self.client = Some(client);
        self.workload = Some(workload);
        std::thread::sleep(Duration::from_millis(cut_after_ms));
        if self.cfg.cut_in_spread {
            let within = Duration::from_millis(500 + self.rng.below(1000));
            let deadline = Instant::now() + Duration::from_secs(30);
            let w = self.workload.as_ref().expect("workload");
            while w.spread_running_for().is_none_or(|d| d < within) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(st) = self.status(A) {
            eprintln!(
                "powerloss: alpha just before the cut: {} client writes ({} bytes), lag {} writes, out of sync {} bytes",
                st["counters"]["client_writes"],
                st["counters"]["client_write_bytes"],
                st["lag"]["writes"],
                st["out_of_sync_bytes"]
            );
        }

        let role = self.cfg.role;
        // The files whose fsync completed before the cut: recorded before it.
        // (A job recorded between this and the kill is left out: conservative.)
        let jobs = self.workload.as_ref().expect("workload").fsynced_jobs();
        let all_jobs = match role {
            Role::Primary | Role::Both => {
                // The application runs on the primary node: it dies with it.
                let mut same = vec![self.agent_pid(A)];
                same.extend(self.workload.as_ref().expect("workload").fio_pids());
                if role == Role::Primary {
                    same.push(self.client_pid());
                    self.nodes[A].disk.cut(&same);
                } else {
                    same.push(self.agent_pid(B));
                    same.push(self.client_pid());
                    let (a, b) = self.nodes.split_at_mut(1);
                    PowerDisk::cut_many(&mut [&mut a[0].disk, &mut b[0].disk], &same);
                }
                self.reap_agent(A);
                if role == Role::Both {
                    self.reap_agent(B);
                }
                self.client.take().expect("client").crash(&[]);
                let mut w = self.workload.take().expect("workload");
                let ended = w.finish(true);
                eprintln!("powerloss: application at the cut: {ended}");
                w.fsynced_jobs()
            }
            Role::SecondaryMidResync => {
                self.outage_then_resync();
                let pid = self.agent_pid(B);
                self.nodes[B].disk.cut(&[pid]);
                self.reap_agent(B);
                self.set_resync_rate("0");
                std::thread::sleep(Duration::from_millis(self.rng.below(2000)));
                let mut w = self.workload.take().expect("workload");
                let ended = w.finish(false);
                eprintln!("powerloss: application after the secondary's cut mid-resync: {ended}");
                w.fsynced_jobs()
            }
            Role::Secondary => {
                let pid = self.agent_pid(B);
                self.nodes[B].disk.cut(&[pid]);
                self.reap_agent(B);
                // The application goes on a little on the primary alone.
                std::thread::sleep(Duration::from_millis(self.rng.below(3000)));
                let mut w = self.workload.take().expect("workload");
                let ended = w.finish(false);
                eprintln!("powerloss: application after the secondary's cut: {ended}");
                w.fsynced_jobs()
            }
        };
        eprintln!(
            "powerloss: cut {} after {cut_after_ms} ms; {} fsync'd files before it",
            role,
            jobs.len()
        );
        let _ = match role {
            Role::Primary => self.after_primary_cut(&jobs),
            Role::Secondary => self.after_secondary_cut(&jobs, &all_jobs),
            // Files fsync'd while it was away are not on it (nor in its last
            // consistent image): it must be consistent, and whole after the resync.
            Role::SecondaryMidResync => self.after_secondary_cut(&[], &all_jobs),
            Role::Both => self.after_both_cut(&jobs),
        };
        jobs.len()
    }

    /// SIGKILL the secondary, let the application write on for a seeded 2-4 s,
    /// slow the primary's resync down, start the secondary again and wait until
    /// the resync runs plus a seeded 0.2-1.5 s: the power cut then falls inside
    /// the resync section.
    fn outage_then_resync(&mut self) {
        if let Some(a) = self.nodes[B].agent.as_ref() {
            a.signal(libc::SIGKILL);
        }
        self.reap_agent(B);
        std::thread::sleep(Duration::from_millis(2000 + self.rng.below(2000)));
        self.set_resync_rate("4M");
        if self.start_agent(B, "secondary").is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.status(A).is_some_and(|s| !s["resync"].is_null()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200 + self.rng.below(1300)));
        match self.status(A) {
            Some(s) if !s["resync"].is_null() => eprintln!(
                "powerloss: cutting the secondary mid-resync: {}",
                s["resync"]
            ),
            _ => eprintln!("powerloss: the resync ended before the cut (not mid-resync this time)"),
        }
    }

    fn set_resync_rate(&mut self, rate: &str) {
        let out = run_with_timeout(
            Command::new(crate::common::tandem_bin())
                .args(["set", "resync-rate", rate, "--control"])
                .arg(&self.nodes[A].control),
            Duration::from_secs(60),
        );
        if !out.status.success() {
            self.find(
                "resync-rate",
                format!("tandem set resync-rate {rate}: {}", describe(&out)),
            );
        }
    }

    fn agent_pid(&self, node: usize) -> i32 {
        self.nodes[node].agent.as_ref().expect("agent runs").pid()
    }

    fn client_pid(&self) -> i32 {
        self.client
            .as_ref()
            .and_then(|c| c.nbdfuse_pid())
            .expect("client nbdfuse runs")
    }

    /// Collect an agent killed by a cut.
    fn reap_agent(&mut self, node: usize) {
        if let Some(mut a) = self.nodes[node].agent.take() {
            a.wait_exit(Duration::from_secs(30));
        }
    }

    fn sync_mode(&self) -> bool {
        self.cfg.mode == "sync"
    }

    /// A secondary's image is its volume plus the records of its redo journal
    /// through its consistent point, not the volume file alone (a checkpoint
    /// may have been copying part of a resync section when the power went). Run
    /// the node alone once, cut off from its peer (its own listen address and
    /// control socket, the peer's address unreachable), and stop it cleanly: the
    /// clean stop copies its consistent image into the volume, which the raw
    /// check then reads, as a promotion would serve it.
    fn settle_secondary_image(&mut self, node: usize) {
        let n = &self.nodes[node];
        let control = self.dir.join(format!("{}-settle.sock", n.name));
        let log = self.dir.join(format!("{}-settle.log", n.name));
        let args: Vec<String> = vec![
            "secondary".into(),
            "--config".into(),
            self.config_file.display().to_string(),
            "--node".into(),
            n.name.into(),
            "--al-extents".into(),
            self.cfg.al_extents.to_string(),
            "--al-extent-size".into(),
            self.cfg
                .al_extent_size_after
                .as_ref()
                .or(self.cfg.al_extent_size.as_ref())
                .map_or("4M".into(), String::clone),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--peer".into(),
            format!("127.0.0.1:{}", free_port()),
            "--control".into(),
            control.display().to_string(),
        ];
        let name = n.name;
        let mut agent = Agent::spawn(name, &args, log, control);
        let deadline = Instant::now() + Duration::from_secs(120);
        while agent.status().is_none() {
            if !agent.is_running() || Instant::now() > deadline {
                let text = agent.log_text();
                drop(agent);
                self.find(
                    "secondary-settle",
                    format!("{name} did not start alone to settle its image: {text}"),
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.signal(libc::SIGTERM);
        let status = agent.wait_exit(Duration::from_secs(300));
        if !status.success() {
            let text = agent.log_text();
            self.find(
                "secondary-settle",
                format!("{name}'s clean stop (settling its image) exited with {status}: {text}"),
            );
        }
    }

    /// Check a node's raw image right after its power returned, before its agent
    /// runs again: a copy (the original must stay untouched for the agent) must
    /// mount, fsck clean and hold every file in `must_hold`.
    fn check_raw_copy(&mut self, node: usize, check: &'static str, must_hold: &[FioJob]) {
        let copy = self.dir.join(format!("raw-{}.img", self.nodes[node].name));
        let out = run_with_timeout(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(self.nodes[node].volume())
                .arg(&copy),
            Duration::from_secs(600),
        );
        assert!(
            out.status.success(),
            "copy of the raw image: {}",
            describe(&out)
        );
        // How far the two copies are apart right now (the peer's image as it is:
        // its agent is idle or stopped), for the log: what a resync must repair.
        let peer = self.nodes[1 - node].volume();
        if peer.exists() {
            match diff_blocks(&copy, &peer) {
                Ok(r) => eprintln!(
                    "powerloss: {}'s durable image differs from {}'s in {} blocks ({} ranges) after the cut",
                    self.nodes[node].name,
                    self.nodes[1 - node].name,
                    r.iter().map(|x| x.1).sum::<u64>(),
                    r.len()
                ),
                Err(e) => eprintln!("powerloss: cannot compare the copies: {e}"),
            }
        }
        let what = format!(
            "{}'s raw image after its power returned",
            self.nodes[node].name
        );
        self.check_fs(
            Mounted::attach_file(&self.dir, &format!("raw-{}", self.nodes[node].name), &copy),
            check,
            &what,
            must_hold,
        );
        let _ = fs::remove_file(&copy);
    }

    /// Mount (journal replay), unmount, `e2fsck -fn`, mount again and verify the
    /// files of `must_hold`, unmount. Each failure is a finding.
    fn check_fs(&mut self, mut m: Mounted, check: &'static str, what: &str, must_hold: &[FioJob]) {
        if let Err(e) = m.mount() {
            self.find(check, format!("{what}: mount failed: {e}"));
            return;
        }
        if let Err(e) = m.umount() {
            self.find(check, format!("{what}: umount failed: {e}"));
            return;
        }
        if let Err(e) = m.fsck() {
            self.find(check, format!("{what}: e2fsck -fn not clean: {e}"));
        }
        if must_hold.is_empty() {
            let _ = m.detach();
            return;
        }
        if let Err(e) = m.mount() {
            self.find(check, format!("{what}: second mount failed: {e}"));
            return;
        }
        let mut bad = Vec::new();
        for job in must_hold {
            if let Err(e) = job.verify(&m.mnt) {
                bad.push(e);
            }
        }
        if !bad.is_empty() {
            self.find(
                check,
                format!(
                    "{what}: {} of {} files fsync'd before the cut fail fio's crc32c verify; first ones:\n{}",
                    bad.len(),
                    must_hold.len(),
                    bad.iter().take(4).cloned().collect::<Vec<_>>().join("\n")
                ),
            );
        }
        if let Err(e) = m.detach() {
            self.find(check, format!("{what}: final umount failed: {e}"));
        }
    }

    /// The primary lost power: its own raw copy is checked, the secondary is
    /// promoted and checked through its export, the old primary rejoins as secondary.
    fn after_primary_cut(&mut self, jobs: &[FioJob]) -> Step {
        self.nodes[A].disk.restore();
        self.check_raw_copy(A, "primary-raw", jobs);
        self.promote(B)?;
        self.check_export(B, "promoted", if self.sync_mode() { jobs } else { &[] });
        self.start_agent(A, "secondary")?;
        self.wait_converged(B, "after the old primary rejoined as secondary")?;
        self.final_check(B, if self.sync_mode() { jobs } else { &[] })
    }

    /// The secondary lost power: its image, settled by a clean stop of the node
    /// alone, must be consistent (and in sync
    /// mode hold every fsync'd file, G1); it restarts and catches up.
    /// `all_jobs`: also those the application fsync'd on the primary alone after
    /// the cut (the final image must hold them too).
    fn after_secondary_cut(&mut self, jobs: &[FioJob], all_jobs: &[FioJob]) -> Step {
        self.nodes[B].disk.restore();
        self.settle_secondary_image(B);
        self.check_raw_copy(
            B,
            "secondary-raw",
            if self.sync_mode() { jobs } else { &[] },
        );
        self.start_agent(B, "secondary")?;
        if let Some(c) = self.client.take()
            && let Err(e) = c.detach()
        {
            self.find(
                "app",
                format!("unmounting the application's ext4 on alpha: {e}"),
            );
        }
        self.wait_converged(A, "after the secondary restarted")?;
        self.final_check(A, all_jobs)
    }

    /// Both lost power: both raw copies are checked; then (seeded) either alpha
    /// comes back as primary (roles from its metadata) or beta is promoted.
    fn after_both_cut(&mut self, jobs: &[FioJob]) -> Step {
        self.nodes[A].disk.restore();
        self.nodes[B].disk.restore();
        self.check_raw_copy(A, "primary-raw", jobs);
        self.settle_secondary_image(B);
        self.check_raw_copy(
            B,
            "secondary-raw",
            if self.sync_mode() { jobs } else { &[] },
        );
        if self.rng.below(2) == 0 {
            eprintln!("powerloss: both cut; alpha restarts as primary, beta as secondary");
            self.start_agent(B, "secondary")?;
            self.start_agent(A, "primary")?;
            self.wait_converged(A, "after both restarted in their roles")?;
            self.final_check(A, jobs)
        } else {
            eprintln!(
                "powerloss: both cut; beta restarts and is promoted, alpha rejoins as secondary"
            );
            self.start_agent(B, "secondary")?;
            self.promote(B)?;
            self.check_export(B, "promoted", if self.sync_mode() { jobs } else { &[] });
            self.start_agent(A, "secondary")?;
            self.wait_converged(B, "after the old primary rejoined as secondary")?;
            self.final_check(B, if self.sync_mode() { jobs } else { &[] })
        }
    }

    /// `tandem promote` as an administrator would after the primary died (retried
    /// while the node still sees its old peer). A refusal is a finding; the trial
    /// then goes on with `--force` so that convergence is still checked.
    fn promote(&mut self, node: usize) -> Step {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last;
        loop {
            let (ok, text) = self.ctl(node, "promote", &[]);
            if ok {
                return Ok(());
            }
            last = text;
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let status = self.status(node).map(|s| s.to_string()).unwrap_or_default();
        // An agent that is gone explains the refusal: say how it ended and
        // what it logged last (a trial once lost its secondary here unexplained).
        let ended = match self.nodes[node].agent.as_mut().map(|a| a.exited()) {
            Some(Some(how)) => format!(
                "; the agent had exited ({how}); {}",
                self.log_tail(node, 30)
            ),
            Some(None) => String::new(),
            None => "; no agent was running".to_string(),
        };
        self.find(
            "promote",
            format!(
                "tandem promote of {} refused for 30 s: {last}; status: {status}{ended}",
                self.nodes[node].name
            ),
        );
        let (ok, text) = self.ctl(node, "promote", &["--force"]);
        if ok {
            Ok(())
        } else {
            self.find("promote", format!("even --force refused: {text}"));
            Err(())
        }
    }

    /// The promoted node's data as its clients see it: through its NBD export.
    fn check_export(&mut self, node: usize, check: &'static str, must_hold: &[FioJob]) {
        let uri = format!("nbd://127.0.0.1:{}", self.nbd_ports[node]);
        let m =
            Mounted::attach_export(&self.dir, &format!("check-{}", self.nodes[node].name), &uri);
        let what = format!("{} promoted, through its export", self.nodes[node].name);
        self.check_fs(m, check, &what, must_hold);
    }

    /// Stop both agents cleanly, compare the images, check the final filesystem.
    fn final_check(&mut self, primary: usize, must_hold: &[FioJob]) -> Step {
        for node in [primary, 1 - primary] {
            let mut agent = self.nodes[node].agent.take().expect("agent runs");
            agent.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(90);
            let status = loop {
                if let Some(c) = agent.child.as_mut()
                    && let Some(s) = c.try_wait().expect("try_wait")
                {
                    agent.child = None;
                    break Some(s);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if status.is_none_or(|s| !s.success()) {
                drop(agent);
                let tail = self.log_tail(node, 20);
                self.find(
                    "stop",
                    format!(
                        "{} did not exit 0 within 90 s of SIGTERM ({status:?}); {tail}",
                        self.nodes[node].name
                    ),
                );
            }
        }
        let (pa, pb) = (self.nodes[A].volume(), self.nodes[B].volume());
        match diff_blocks(&pa, &pb) {
            Ok(ranges) if ranges.is_empty() => {}
            Ok(ranges) => {
                let blocks: u64 = ranges.iter().map(|r| r.1).sum();
                let shown: Vec<String> = ranges
                    .iter()
                    .take(8)
                    .map(|(b, n)| format!("blocks {b}..{} ({n})", b + n))
                    .collect();
                let owners = block_owners(&self.nodes[primary].volume(), &ranges);
                let extents: std::collections::BTreeSet<u64> = ranges
                    .iter()
                    .flat_map(|(b, n)| (*b / 1024)..=((*b + n - 1) / 1024))
                    .collect();
                let contents: Vec<String> = ranges
                    .iter()
                    .take(3)
                    .map(|(b, _)| {
                        format!(
                            "block {b}: {} {}, {} {}",
                            self.nodes[A].name,
                            block_summary(&pa, *b),
                            self.nodes[B].name,
                            block_summary(&pb, *b)
                        )
                    })
                    .collect();
                self.find(
                    "diverged",
                    format!(
                        "after convergence (status in sync) the images differ in {blocks} blocks of 4 KiB in {} ranges, within {} of the 4 MiB activity-log extents: {}{}; contents: {}; owners on the final primary's ext4: {owners}",
                        ranges.len(),
                        extents.len(),
                        shown.join(", "),
                        if ranges.len() > 8 { ", ..." } else { "" },
                        contents.join("; ")
                    ),
                );
            }
            Err(e) => self.find("diverged", format!("cannot compare the images: {e}")),
        }
        let image = self.nodes[primary].volume();
        let what = format!(
            "final image of {} (the primary) after convergence",
            self.nodes[primary].name
        );
        self.check_fs(
            Mounted::attach_file(&self.dir, "final", &image),
            "final-fs",
            &what,
            must_hold,
        );
        Ok(())
    }

    fn scan_logs_for_panics(&mut self) {
        for node in [A, B] {
            let text = fs::read_to_string(&self.nodes[node].log).unwrap_or_default();
            if let Some(i) = text.find("panicked") {
                let from = text[..i].rfind('\n').map_or(0, |j| j + 1);
                let excerpt: String = text[from..].lines().take(6).collect::<Vec<_>>().join("\n");
                let name = self.nodes[node].name;
                self.find("panic", format!("{name} panicked:\n{excerpt}"));
            }
        }
    }

    /// With POWERLOSS_KEEP=1: stop the processes but keep the files.
    fn stop_everything_for_keep(&mut self) {
        self.workload.take();
        self.client.take();
        for n in &mut self.nodes {
            n.agent.take();
            if n.disk.is_powered() {
                n.disk.power_off_clean();
            }
        }
    }
}

/// Differing 4 KiB blocks of two equally sized images, as (first block, count) ranges.
pub fn diff_blocks(a: &Path, b: &Path) -> std::io::Result<Vec<(u64, u64)>> {
    use std::io::Read;
    const CHUNK: usize = 1 << 20;
    let (la, lb) = (fs::metadata(a)?.len(), fs::metadata(b)?.len());
    if la != lb {
        return Err(std::io::Error::other(format!(
            "sizes differ: {la} vs {lb} bytes"
        )));
    }
    let mut fa = std::io::BufReader::with_capacity(CHUNK, fs::File::open(a)?);
    let mut fb = std::io::BufReader::with_capacity(CHUNK, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0u64;
    while offset < la {
        let n = CHUNK.min((la - offset) as usize);
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
                if x != y {
                    let block = offset / 4096 + i as u64;
                    match ranges.last_mut() {
                        Some((first, count)) if *first + *count == block => *count += 1,
                        _ => ranges.push((block, 1)),
                    }
                }
            }
        }
        offset += n as u64;
    }
    Ok(ranges)
}

/// "zeros" or the first bytes of a 4 KiB block, in hex.
fn block_summary(image: &Path, block: u64) -> String {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    match fs::File::open(image).and_then(|f| f.read_exact_at(&mut buf, block * 4096)) {
        Ok(()) if buf.iter().all(|&x| x == 0) => "zeros".into(),
        Ok(()) => format!(
            "data {}...",
            buf[..12]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        ),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// Which inodes and paths own the first differing blocks (ext4 with 4 KiB blocks
/// at offset 0 of the volume): `debugfs icheck` then `ncheck`, read-only.
fn block_owners(image: &Path, ranges: &[(u64, u64)]) -> String {
    let blocks: Vec<String> = ranges
        .iter()
        .flat_map(|(b, n)| (*b..*b + (*n).min(2)).map(|x| x.to_string()))
        .take(6)
        .collect();
    let run = |req: String| -> String {
        let out = run_with_timeout(
            Command::new("debugfs").arg("-R").arg(&req).arg(image),
            Duration::from_secs(60),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let icheck = run(format!("icheck {}", blocks.join(" ")));
    let inodes: Vec<String> = icheck
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|i| i.parse::<u64>().is_ok())
        .map(str::to_owned)
        .collect();
    let ncheck = if inodes.is_empty() {
        String::new()
    } else {
        run(format!("ncheck {}", inodes.join(" ")))
    };
    format!(
        "{}{}",
        icheck.trim().replace('\n', "; "),
        if ncheck.is_empty() {
            String::new()
        } else {
            format!(" | {}", ncheck.trim().replace('\n', "; "))
        }
    )
}

/// Certificates for alpha and beta, made once per test process.
pub fn certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    make_certs(&certs, &NODES);
    certs
}
