//! Issue 11 item 4: stream compression over a throttled link, with real agent
//! processes and the fault proxy as the WAN.
//!
//! The primary's frames cross the link as one zstd stream per connection (the
//! level adapting to the link being the bottleneck), so compressible data
//! crosses a throttled link in a fraction of its size. The data is the issue's
//! workload: files of /usr/lib, written through the NBD export. What crossed the
//! link (the proxy's count: TLS, frame headers and all) is compared with what
//! was written; the pair converges with identical images. Speed itself is
//! measured by tools (benches/RESULTS.md), not asserted here.

mod common;
#[allow(dead_code)]
#[path = "common/faults.rs"]
mod faults;

use std::time::Instant;

use bytes::Bytes;
use faultproxy::{Dir, Fault};
use faults::{Model, Rig, RigOpts, counter, mib};
use tandem::nbd::client::NbdClient;

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 64 * MIB;
const WRITE_BYTES: u64 = 24 * MIB;

/// Up to `len` bytes of the regular files under `dir`, in a stable order.
fn corpus(dir: &std::path::Path, len: usize, out: &mut Vec<u8>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if out.len() >= len {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            corpus(&p, len, out);
        } else if meta.is_file()
            && let Ok(data) = std::fs::read(&p)
        {
            out.extend_from_slice(&data[..data.len().min(len - out.len())]);
        }
    }
}

#[test]
fn compressible_writes_cross_a_throttled_link_as_a_compressed_stream() {
    let seed = common::seed("wan stream");
    let mut rig = Rig::start(RigOpts::new("async", SIZE_BYTES), seed);
    let mut data = Vec::new();
    corpus(
        std::path::Path::new("/usr/lib"),
        WRITE_BYTES as usize,
        &mut data,
    );
    assert_eq!(data.len() as u64, WRITE_BYTES, "/usr/lib holds 24 MiB");
    let before = rig.proxy.stats().bytes_up;
    let s0 = rig.primary.status().expect("status");
    rig.proxy.set(Fault::Throttle {
        bytes_per_s: 4 * MIB,
        dir: Dir::Up,
    });
    let started = Instant::now();
    let addr = rig.nbd_addr();
    rig.rt.block_on(async {
        let c = NbdClient::connect(&addr, "").await.expect("connect");
        let data = Bytes::from(data);
        for off in (0..WRITE_BYTES).step_by(MIB as usize) {
            let chunk = data.slice(off as usize..(off + MIB) as usize);
            c.write(off, chunk, false).await.expect("write");
        }
        c.flush().await.expect("flush");
    });
    let s = rig.wait_converged("after the copy");
    let secs = started.elapsed().as_secs_f64();
    let on_link = rig.proxy.stats().bytes_up - before;
    let replicated = counter(&s, "replicated_bytes") - counter(&s0, "replicated_bytes");
    let wire = counter(&s, "replicated_wire_bytes") - counter(&s0, "replicated_wire_bytes");
    eprintln!(
        "wan stream: {} written, {} replicated, {} of stream on the wire, {} through the link in {secs:.1} s ({:.2}x the 4 MiB/s link rate; {:.2}x smaller)",
        mib(WRITE_BYTES),
        mib(replicated),
        mib(wire),
        mib(on_link),
        WRITE_BYTES as f64 / secs / (4 * MIB) as f64,
        WRITE_BYTES as f64 / on_link as f64
    );
    rig.proxy.clear();
    rig.finish(&Model::shared());
    assert!(replicated >= WRITE_BYTES, "{replicated}");
    assert!(
        on_link * 2 < WRITE_BYTES,
        "{on_link} bytes crossed the link for {WRITE_BYTES} bytes of /usr/lib"
    );
}
