//! Cost of each step a write's data goes through on the wire path (G5):
//! crc32, zstd compress and decompress, frame encode and decode, for 4 KiB
//! (one block) and 1 MiB (a large sequential write) payloads, with
//! compressible (text-like) and random (incompressible) data.
//!
//! Throughput is counted in uncompressed payload bytes, so encode/decode of
//! compressible data (which moves only the compressed bytes) shows how much
//! the frame step costs per byte the application wrote.
//!
//! `cargo bench --bench frame_pipeline -- --quick` for a fast run.

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use rand::{RngCore, SeedableRng};
use tandem::wire::{Frame, Message, Payload, decode_frame, encode_frame};

const ZSTD_LEVEL: i32 = 3;

fn inputs() -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for (size_name, len_bytes) in [("4KiB", 4usize << 10), ("1MiB", 1usize << 20)] {
        let mut random = vec![0u8; len_bytes];
        rand::rngs::StdRng::seed_from_u64(42).fill_bytes(&mut random);
        // Compressible: repeated log-like lines with a changing counter, which
        // zstd shrinks roughly 5-10x, like filesystem metadata or text.
        let mut text = Vec::with_capacity(len_bytes);
        let mut i = 0u64;
        while text.len() < len_bytes {
            text.extend_from_slice(
                format!("2026-01-01T00:00:{:02} block {i} written ok\n", i % 60).as_bytes(),
            );
            i += 1;
        }
        text.truncate(len_bytes);
        out.push((format!("{size_name}/compressible"), Bytes::from(text)));
        out.push((format!("{size_name}/random"), Bytes::from(random)));
    }
    out
}

fn write_frame(payload: Payload) -> Frame {
    Frame {
        seq: 1,
        msg: Message::Write {
            offset: 1 << 20,
            fua: false,
            at_ms: 0,
        },
        payload,
    }
}

fn bench(c: &mut Criterion) {
    let inputs = inputs();

    let mut g = c.benchmark_group("crc32");
    for (name, data) in &inputs {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), data, |b, d| {
            b.iter(|| crc32fast::hash(black_box(d)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("prepare_zstd3");
    for (name, data) in &inputs {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), data, |b, d| {
            b.iter(|| Payload::prepare(black_box(d.clone()), ZSTD_LEVEL))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("open_zstd3");
    for (name, data) in &inputs {
        let prepared = Payload::prepare(data.clone(), ZSTD_LEVEL);
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &prepared, |b, p| {
            b.iter(|| black_box(p.clone()).open().expect("payload opens"))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("encode_frame");
    for (name, data) in &inputs {
        let frame = write_frame(Payload::prepare(data.clone(), ZSTD_LEVEL));
        let mut out = BytesMut::with_capacity(data.len() + 1024);
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &frame, |b, f| {
            b.iter(|| {
                out.clear();
                encode_frame(black_box(f), &mut out);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("decode_frame");
    for (name, data) in &inputs {
        let mut buf = BytesMut::new();
        encode_frame(
            &write_frame(Payload::prepare(data.clone(), ZSTD_LEVEL)),
            &mut buf,
        );
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &buf, |b, buf| {
            b.iter(|| {
                decode_frame(black_box(buf))
                    .expect("frame decodes")
                    .expect("frame is complete")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
