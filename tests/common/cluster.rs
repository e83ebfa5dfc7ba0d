//! A two-node resource (alpha, beta) described by one resource file, as an
//! administrator deploys it: each node runs `tandem primary|secondary --config
//! r0.toml --node NAME`, and roles change with `tandem promote|demote|resolve`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{Agent, READY_TIMEOUT, Site, free_port, primary_in_sync, run_with_timeout, tandem_bin};

pub const NODES: [&str; 2] = ["alpha", "beta"];

pub struct Cluster {
    /// Running agents by node index (0 = alpha, 1 = beta); declared before the site
    /// so they are killed (and their logs printed) before the directory goes.
    pub agents: [Option<Agent>; 2],
    pub config: PathBuf,
    pub nbd_ports: [u16; 2],
    pub size_bytes: u64,
    pub site: Site,
}

impl Cluster {
    /// Write certificates and the resource file; start nothing. `resource_extra` is
    /// appended to the `[resource]` section (e.g. `split-brain-policy = "..."`).
    pub fn new(mode: &str, size_bytes: u64, resource_extra: &str) -> Cluster {
        let site = Site::with_names(&NODES);
        let nbd_ports = [free_port(), free_port()];
        let mut text = format!(
            "[resource]\nname = \"r0\"\nmode = \"{mode}\"\ntls-dir = \"{}\"\n# Short timeouts keep the tests quick.\npeer-timeout-ms = 2000\nheartbeat-interval-ms = 300\ndrain-timeout-ms = 10000\n{resource_extra}\n",
            site.certs.display()
        );
        for (i, name) in NODES.iter().enumerate() {
            text += &format!(
                "\n[nodes.{name}]\naddress = \"127.0.0.1:{}\"\nvolume = \"{}\"\nsize = {size_bytes}\nnbd = \"127.0.0.1:{}\"\ncontrol = \"{}\"\n",
                free_port(),
                site.path(&format!("{name}.img")).display(),
                nbd_ports[i],
                site.path(&format!("{name}.sock")).display(),
            );
        }
        let config = site.path("r0.toml");
        std::fs::write(&config, text).expect("write resource file");
        Cluster {
            agents: [None, None],
            config,
            nbd_ports,
            size_bytes,
            site,
        }
    }

    pub fn image(&self, node: usize) -> PathBuf {
        self.site.path(&format!("{}.img", NODES[node]))
    }

    pub fn control(&self, node: usize) -> PathBuf {
        self.site.path(&format!("{}.sock", NODES[node]))
    }

    pub fn meta(&self, node: usize) -> PathBuf {
        self.site.path(&format!("{}.img.tandem-meta", NODES[node]))
    }

    pub fn nbd_uri(&self, node: usize) -> String {
        format!("nbd://127.0.0.1:{}", self.nbd_ports[node])
    }

    pub fn nbd_addr(&self, node: usize) -> String {
        format!("127.0.0.1:{}", self.nbd_ports[node])
    }

    /// Start `node` in `role` ("primary" or "secondary") and wait for its control socket.
    pub fn start(&mut self, node: usize, role: &str) {
        assert!(self.agents[node].is_none(), "{} already runs", NODES[node]);
        let args: Vec<String> = vec![
            role.into(),
            "--config".into(),
            self.config.display().to_string(),
            "--node".into(),
            NODES[node].into(),
        ];
        let mut agent = Agent::spawn(
            NODES[node],
            &args,
            self.site.path(&format!("{}.log", NODES[node])),
            self.control(node),
        );
        agent.wait_status("control socket", READY_TIMEOUT, |_| true);
        self.agents[node] = Some(agent);
    }

    pub fn agent(&mut self, node: usize) -> &mut Agent {
        self.agents[node]
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", NODES[node]))
    }

    /// SIGTERM `node` and require a clean exit.
    pub fn stop(&mut self, node: usize) {
        let mut a = self.agents[node].take().expect("running");
        a.stop();
    }

    /// SIGKILL `node` (a crash).
    pub fn kill(&mut self, node: usize) {
        let mut a = self.agents[node].take().expect("running");
        a.signal(libc::SIGKILL);
        a.wait_exit(Duration::from_secs(30));
    }

    /// `tandem <cmd> --control SOCK <args>`: (success, stdout + stderr).
    pub fn ctl(&self, node: usize, cmd: &str, args: &[&str]) -> (bool, String) {
        let out = run_with_timeout(
            Command::new(tandem_bin())
                .arg(cmd)
                .arg("--control")
                .arg(self.control(node))
                .args(args),
            Duration::from_secs(120),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Like [`Cluster::ctl`], and the command must succeed.
    pub fn ctl_ok(&self, node: usize, cmd: &str, args: &[&str]) -> String {
        let (ok, text) = self.ctl(node, cmd, args);
        assert!(ok, "tandem {cmd} on {} failed: {text}", NODES[node]);
        text
    }

    /// Wait until `primary` reports its peer connected and in sync, and the other
    /// node reports UpToDate in the same generation.
    pub fn wait_synced(&mut self, primary: usize, timeout: Duration) {
        let p = self
            .agent(primary)
            .wait_status("connected and in sync", timeout, |s| {
                s["role"] == "primary" && primary_in_sync(s)
            });
        let generation = p["generation"].clone();
        self.agent(1 - primary)
            .wait_status("UpToDate in the primary's generation", timeout, |s| {
                s["role"] == "secondary"
                    && s["disk_state"] == "UpToDate"
                    && s["peer"]["connection"] == "connected"
                    && s["generation"] == generation
            });
    }

    pub fn status(&mut self, node: usize) -> serde_json::Value {
        self.agent(node).status().expect("status")
    }
}
