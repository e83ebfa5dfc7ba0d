//! `tandem demo`: the whole system on loopback in one process.
//!
//! Makes certificates in a directory, starts a secondary and a primary with
//! fresh sparse images, drives a mixed workload (sequential 1 MiB writes of
//! compressible data, random 4 KiB writes of random data at queue depth 16,
//! write-zeroes, trims, flushes) through the primary's NBD export with the NBD
//! client over real TCP, prints a live line, shuts both agents down the way
//! SIGTERM does, and compares the two images by blake3. Sync mode first, then async.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::config::{NodeConfig, Overrides};
use crate::metrics::Metrics;
use crate::nbd::client::NbdClient;
use crate::types::Role;

const MIB: f64 = (1u64 << 20) as f64;

/// Run the demo; Ok(true) when every mode ended with identical images.
pub async fn run(size_bytes: u64, seconds: u64, dir: Option<PathBuf>) -> Result<bool, String> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            d
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("tandem-demo-")
                .tempdir()
                .map_err(|e| format!("creating a temporary directory: {e}"))?;
            tmp.path().to_owned()
        }
    };
    println!("tandem demo in {}", dir.display());
    let tls = dir.join("tls");
    if !tls.join("ca.pem").exists() {
        crate::transport::generate_certs(&tls, &["primary", "secondary"])
            .map_err(|e| e.to_string())?;
    }
    println!(
        "  certificates: {}/ca.pem, primary.pem, secondary.pem (mutual TLS 1.3)",
        tls.display()
    );
    let mut all_ok = true;
    for mode in ["sync", "async"] {
        all_ok &= run_mode(&dir, &tls, mode, size_bytes, seconds).await?;
    }
    println!(
        "{}",
        if all_ok {
            "demo passed: images identical in both modes"
        } else {
            "demo FAILED: images differ"
        }
    );
    Ok(all_ok)
}

async fn run_mode(
    dir: &Path,
    tls: &Path,
    mode: &str,
    size_bytes: u64,
    seconds: u64,
) -> Result<bool, String> {
    let sec_img = dir.join(format!("secondary-{mode}.img"));
    let pri_img = dir.join(format!("primary-{mode}.img"));
    for p in [&sec_img, &pri_img] {
        for suffix in ["", ".tandem-meta"] {
            let mut s = p.clone().into_os_string();
            s.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(s));
        }
    }
    let size = size_bytes.to_string();
    let sec_cfg = NodeConfig::resolve(
        Role::Secondary,
        Overrides {
            volume: Some(sec_img.clone()),
            size: Some(size.clone()),
            listen: Some("127.0.0.1:0".parse().expect("literal")),
            tls_dir: Some(tls.to_owned()),
            mode: Some(mode.into()),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let sec_stop = CancellationToken::new();
    let (tx, rx) = oneshot::channel();
    let secondary = tokio::spawn(agent::secondary::run(sec_cfg, sec_stop.clone(), Some(tx)));
    let sec_ready = rx
        .await
        .map_err(|_| "secondary failed to start (see the log above)".to_string())?;

    let pri_cfg = NodeConfig::resolve(
        Role::Primary,
        Overrides {
            volume: Some(pri_img.clone()),
            size: Some(size),
            peer: Some(sec_ready.listen),
            nbd: Some("127.0.0.1:0".into()),
            tls_dir: Some(tls.to_owned()),
            mode: Some(mode.into()),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let pri_stop = CancellationToken::new();
    let (tx, rx) = oneshot::channel();
    let primary = tokio::spawn(agent::primary::run(pri_cfg, pri_stop.clone(), Some(tx)));
    let ready = rx
        .await
        .map_err(|_| "primary failed to start (see the log above)".to_string())?;
    println!(
        "\n== {mode} mode: primary NBD export at {}, secondary at {}",
        ready.nbd, sec_ready.listen
    );

    let client = NbdClient::connect(&ready.nbd.to_string(), "")
        .await
        .map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn(live_line(
        mode.to_string(),
        ready.metrics.clone(),
        done.clone(),
    ));
    let workload = workload(client.clone(), size_bytes, Duration::from_secs(seconds)).await;
    client.flush().await.map_err(|e| format!("flush: {e}"))?;
    done.store(true, Ordering::Relaxed);
    let _ = live.await;
    let writes = workload?;
    client.disconnect().await.map_err(|e| e.to_string())?;
    // The initial sync ran under the workload; let it and the replication queue
    // finish so the comparison below is of two complete copies.
    let waited = Instant::now();
    while !ready.metrics.in_sync() {
        if waited.elapsed() > Duration::from_secs(120) {
            return Err("the secondary did not catch up within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if waited.elapsed() > Duration::from_millis(500) {
        println!(
            "  waited {:.1} s for the initial sync and the queue to finish",
            waited.elapsed().as_secs_f64()
        );
    }

    // Stop like SIGTERM: drain to the secondary, persist, exit.
    pri_stop.cancel();
    primary
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("primary: {e}"))?;
    sec_stop.cancel();
    secondary
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("secondary: {e}"))?;
    let m = &ready.metrics;
    println!(
        "  {writes} requests; {:.1} MiB written, {:.1} MiB replicated ({:.1} MiB on the wire, compression {:.2}x)",
        Metrics::get(&m.client_write_bytes) as f64 / MIB,
        Metrics::get(&m.replicated_bytes) as f64 / MIB,
        Metrics::get(&m.replicated_wire_bytes) as f64 / MIB,
        m.compression_ratio()
    );
    let lat = m.latency_summary();
    println!(
        "  write latency: p50 {} µs, p99 {} µs",
        lat.p50_us, lat.p99_us
    );
    let a = hash_file(&pri_img)?;
    let b = hash_file(&sec_img)?;
    println!("  blake3 primary   {a}\n  blake3 secondary {b}");
    let same = a == b;
    println!("  {}", if same { "identical" } else { "DIFFERENT" });
    Ok(same)
}

/// Mixed workload until `duration` passes; returns the number of requests.
async fn workload(client: NbdClient, size_bytes: u64, duration: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    // 16 random writers (QD16) and 1 sequential writer of compressible data.
    for worker in 0..17u64 {
        let client = client.clone();
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(0x7a4d_0000 + worker);
            let mut n = 0u64;
            let mut seq_off = 0u64;
            let text: Vec<u8> = b"tandem replicates every write in order; "
                .iter()
                .copied()
                .cycle()
                .take(1 << 20)
                .collect();
            let blocks = size_bytes / 4096;
            while Instant::now() < deadline {
                let r = if worker == 16 {
                    let len = (1u64 << 20).min(size_bytes - seq_off);
                    let r = client
                        .write(
                            seq_off,
                            Bytes::copy_from_slice(&text[..len as usize]),
                            false,
                        )
                        .await;
                    seq_off = (seq_off + len) % size_bytes;
                    r
                } else {
                    let off = rng.gen_range(0..blocks) * 4096;
                    match rng.gen_range(0..100) {
                        0..=1 => client.write_zeroes(off, 4096, false).await,
                        2..=3 => client.trim(off, 4096).await,
                        4 => client.flush().await,
                        5..=6 => {
                            client
                                .write(off, Bytes::from(vec![0u8; 4096]), rng.gen_bool(0.5))
                                .await
                        }
                        _ => {
                            let mut data = vec![0u8; 4096];
                            rng.fill(&mut data[..]);
                            client.write(off, Bytes::from(data), false).await
                        }
                    }
                };
                r.map_err(|e| format!("workload request failed: {e}"))?;
                n += 1;
            }
            Ok::<u64, String>(n)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r.map_err(|e| e.to_string())??;
    }
    Ok(total)
}

async fn live_line(mode: String, m: Arc<Metrics>, done: Arc<AtomicBool>) {
    let tty = std::io::stdout().is_terminal();
    let mut last = (Instant::now(), 0u64, 0u64);
    while !done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 2000 })).await;
        let now = Instant::now();
        let w = Metrics::get(&m.client_write_bytes);
        let r = Metrics::get(&m.replicated_bytes);
        let dt = (now - last.0).as_secs_f64().max(1e-3);
        let line = format!(
            "  {mode}: written {:7.1} MiB/s  replicated {:7.1} MiB/s  lag {:5} writes {:6.1} MiB {:5.3} s  compression {:.2}x",
            (w - last.1) as f64 / MIB / dt,
            (r - last.2) as f64 / MIB / dt,
            Metrics::get(&m.lag_writes),
            Metrics::get(&m.lag_bytes) as f64 / MIB,
            m.lag_seconds(),
            m.compression_ratio()
        );
        last = (now, w, r);
        if tty {
            print!("\r{line}");
            let _ = std::io::stdout().flush();
        } else {
            println!("{line}");
        }
    }
    if tty {
        println!();
    }
}

/// blake3 of a whole file, as hex.
pub fn hash_file(path: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}
