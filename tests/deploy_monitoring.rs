//! The shipped monitoring files are valid for the tools that load them:
//! `promtool check rules` (Prometheus's own checker) accepts the alert rules,
//! and the example resource file with its monitoring options resolves.

use std::process::Command;

#[test]
fn promtool_accepts_the_alert_rules() {
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/tandem-alerts.yml"
    );
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .expect("promtool (Debian package prometheus; tools/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(text.contains("SUCCESS: 5 rules found"), "{text}");
}

#[test]
fn the_example_resource_file_sets_metrics_and_rpo() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/r0.toml");
    let cfg = tandem::config::NodeConfig::resolve(
        tandem::types::Role::Primary,
        tandem::config::Overrides {
            config: Some(file.into()),
            node: Some("alpha".into()),
            ..Default::default()
        },
    )
    .expect("deploy/r0.toml resolves for alpha");
    assert_eq!(
        cfg.metrics,
        Some("127.0.0.1:9942".parse().expect("address"))
    );
    assert_eq!(cfg.rpo_seconds, Some(30.0));
}
