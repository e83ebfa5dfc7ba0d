//! TLS on the primary's NBD export, with the real agent and real clients:
//! qemu-io and qemu-img (gnutls, `--object tls-creds-x509`) and nbdinfo
//! (`nbds://` URIs) connect with a client certificate from `tandem certs` for a
//! name listed with `--nbd-tls-client`; a plaintext client, a client without a
//! certificate, one with a certificate for an unlisted name and one from another
//! CA are refused, each failure counted and logged rate-limited. A plaintext
//! export on a non-loopback address is refused at startup unless
//! `--danger-nbd-plaintext`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{NodeOpts, Site, free_port, run_ok, run_with_timeout};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A credentials directory as gnutls clients (qemu, libnbd) expect it.
fn creds(site: &Site, label: &str, certs: &Path, client: Option<&str>) -> PathBuf {
    let dir = site.path(label);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(certs.join("ca.pem"), dir.join("ca-cert.pem")).unwrap();
    if let Some(name) = client {
        std::fs::copy(
            certs.join(format!("{name}.pem")),
            dir.join("client-cert.pem"),
        )
        .unwrap();
        std::fs::copy(
            certs.join(format!("{name}.key")),
            dir.join("client-key.pem"),
        )
        .unwrap();
    }
    dir
}

#[test]
fn qemu_and_nbdinfo_use_client_certificates_and_others_are_refused() {
    let site = Site::with_names(&["primary", "secondary", "backup", "intruder"]);
    let nbd_port = free_port();
    let image = site.path("primary.img");
    let mut primary = site.primary(
        "primary",
        &image,
        256 << 20,
        "async",
        free_port(),
        nbd_port,
        &NodeOpts {
            tls_dir: None,
            extra: vec!["--nbd-tls-client".into(), "backup".into()],
        },
    );
    primary.wait_status("serving", TIMEOUT, |_| true);
    let good = creds(&site, "good", &site.certs, Some("backup"));
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        good.display()
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={nbd_port},tls-creds=tls0");
    let out = run_ok(
        Command::new("qemu-io").args([
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x7e 1M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x7e 1M 64k",
        ]),
        TIMEOUT,
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    let map = run_ok(
        Command::new("qemu-img").args([
            "map",
            "--output=json",
            "--object",
            &object,
            "--image-opts",
            &opts,
        ]),
        TIMEOUT,
    );
    assert!(
        map.contains("\"start\": 1048576, \"length\": 65536"),
        "{map}"
    );
    let info = run_ok(
        Command::new("nbdinfo").arg(format!(
            "nbds://127.0.0.1:{nbd_port}/?tls-certificates={}",
            good.display()
        )),
        TIMEOUT,
    );
    assert!(info.contains("with TLS"), "{info}");
    // The data went through the export.
    let mut on_disk = vec![0u8; 65536];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut on_disk, 1 << 20)
        .unwrap();
    assert!(on_disk.iter().all(|b| *b == 0x7e));

    // Refused: plaintext, no certificate, an unlisted name, another CA.
    let other_ca = site.path("other-ca");
    common::make_certs(&other_ca, &["backup"]);
    let foreign = creds(&site, "foreign", &other_ca, Some("backup"));
    std::fs::copy(site.certs.join("ca.pem"), foreign.join("ca-cert.pem")).unwrap();
    let refused = [
        format!("nbd://127.0.0.1:{nbd_port}"),
        format!(
            "nbds://127.0.0.1:{nbd_port}/?tls-certificates={}",
            creds(&site, "none", &site.certs, None).display()
        ),
        format!(
            "nbds://127.0.0.1:{nbd_port}/?tls-certificates={}",
            creds(&site, "intruder", &site.certs, Some("intruder")).display()
        ),
        format!(
            "nbds://127.0.0.1:{nbd_port}/?tls-certificates={}",
            foreign.display()
        ),
    ];
    for _ in 0..5 {
        for uri in &refused {
            let out = run_with_timeout(Command::new("nbdinfo").arg(uri), TIMEOUT);
            assert!(!out.status.success(), "nbdinfo {uri} was admitted");
        }
    }
    let out = run_with_timeout(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{nbd_port}"),
            "-c",
            "read 0 512",
        ]),
        TIMEOUT,
    );
    assert!(!out.status.success(), "plaintext qemu-io was admitted");
    // 15 failed TLS handshakes, logged once (the rest is summarised once a minute).
    let log = primary.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("TLS handshake failed"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines for refused TLS clients:\n{log}"
    );
    primary.stop();
}

#[test]
fn a_plaintext_export_off_loopback_is_refused_at_startup() {
    let site = Site::new();
    for (role, args) in [
        (
            "primary",
            vec![
                "--nbd".to_string(),
                "192.0.2.1:10809".into(),
                "--peer".into(),
                "127.0.0.1:9".into(),
            ],
        ),
        (
            "secondary",
            vec![
                "--export-readonly".to_string(),
                "192.0.2.1:10809".into(),
                "--listen".into(),
                format!("127.0.0.1:{}", free_port()),
            ],
        ),
    ] {
        let image = site.path(&format!("{role}.img"));
        let out = run_with_timeout(
            Command::new(common::tandem_bin())
                .arg(role)
                .arg("--volume")
                .arg(&image)
                .args(["--size", "16M", "--tls-dir"])
                .arg(&site.certs)
                .arg("--control")
                .arg(site.path(&format!("{role}.sock")))
                .args(&args),
            TIMEOUT,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{role} started a plaintext export off loopback"
        );
        assert!(
            err.contains("192.0.2.1:10809") && err.contains("--danger-nbd-plaintext"),
            "{err}"
        );
        assert!(!image.exists(), "{role} touched its volume before refusing");
    }
}

#[test]
fn export_options_come_from_the_resource_file_and_flags_win() {
    use tandem::config::{NodeConfig, Overrides};
    use tandem::types::Role;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r0.toml");
    std::fs::write(
        &file,
        r#"
[resource]
name = "r0"
nbd-tls-clients = ["backup", "restore"]

[nodes.alpha]
address = "127.0.0.1:7001"
volume = "/srv/a.img"
nbd = "0.0.0.0:10809"

[nodes.beta]
address = "127.0.0.1:7002"
volume = "/srv/b.img"
export-readonly = "127.0.0.1:10810"
"#,
    )
    .unwrap();
    let overrides = |node: &str| Overrides {
        config: Some(file.clone()),
        node: Some(node.into()),
        ..Default::default()
    };
    // TLS is configured, so the export may listen off loopback.
    let alpha = NodeConfig::resolve(Role::Primary, overrides("alpha")).unwrap();
    assert_eq!(alpha.nbd_tls_clients, ["backup", "restore"]);
    assert!(!alpha.danger_nbd_plaintext);
    let beta = NodeConfig::resolve(Role::Secondary, overrides("beta")).unwrap();
    assert_eq!(beta.export_readonly.as_deref(), Some("127.0.0.1:10810"));
    let flags = Overrides {
        nbd_tls_clients: vec!["other".into()],
        export_readonly: Some("unix:/run/ro.sock".into()),
        ..overrides("beta")
    };
    let beta = NodeConfig::resolve(Role::Secondary, flags).unwrap();
    assert_eq!(beta.nbd_tls_clients, ["other"]);
    assert_eq!(beta.export_readonly.as_deref(), Some("unix:/run/ro.sock"));
    // Without TLS the non-loopback export is refused, naming the way out.
    std::fs::write(
        &file,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("nbd-tls-clients = [\"backup\", \"restore\"]", ""),
    )
    .unwrap();
    let e = NodeConfig::resolve(Role::Primary, overrides("alpha")).unwrap_err();
    assert!(e.to_string().contains("--danger-nbd-plaintext"), "{e}");
    let alpha = NodeConfig::resolve(
        Role::Primary,
        Overrides {
            danger_nbd_plaintext: true,
            ..overrides("alpha")
        },
    )
    .unwrap();
    assert!(alpha.danger_nbd_plaintext);
}
