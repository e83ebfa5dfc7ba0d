//! Record real traffic and turn it into seed corpora for the fuzz targets.
//!
//! `fuzz-record proxy --listen ADDR --to ADDR --out DIR`: a TCP proxy that
//! forwards every connection and writes what each side sent to
//! `DIR/conn-N.c2s` (client to server) and `DIR/conn-N.s2c`. Put it between a
//! plaintext primary and secondary (`--danger-plaintext`, loopback) or between
//! an NBD client and the primary's export.
//!
//! `fuzz-record seeds --replication DIR --nbd DIR --corpus DIR`: cut the
//! recordings into small seeds for each target (see `tools/fuzz/record-seeds.sh`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tandem::wire::{Frame, decode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest seed file: small seeds keep the corpus in the repository small and
/// the fuzzer fast.
const SEED_BYTES_MAX: usize = 16 << 10;

fn usage() -> anyhow::Error {
    anyhow::anyhow!(
        "usage: fuzz-record proxy --listen ADDR --to ADDR --out DIR\n       fuzz-record seeds --replication DIR --nbd DIR --corpus DIR"
    )
}

fn flag(args: &[String], name: &str) -> anyhow::Result<String> {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].clone())
        .ok_or_else(usage)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("proxy") => {
            let listen: SocketAddr = flag(&args, "--listen")?.parse()?;
            let to: SocketAddr = flag(&args, "--to")?.parse()?;
            let out = PathBuf::from(flag(&args, "--out")?);
            proxy(listen, to, &out).await
        }
        Some("seeds") => seeds(
            Path::new(&flag(&args, "--replication")?),
            Path::new(&flag(&args, "--nbd")?),
            Path::new(&flag(&args, "--corpus")?),
        ),
        _ => Err(usage()),
    }
}

async fn proxy(listen: SocketAddr, to: SocketAddr, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let mut n = 0;
    loop {
        let (client, _) = listener.accept().await?;
        n += 1;
        let server = match tokio::net::TcpStream::connect(to).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("fuzz-record: connecting to {to}: {e}");
                continue;
            }
        };
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let c2s = out.join(format!("conn-{n}.c2s"));
        let s2c = out.join(format!("conn-{n}.s2c"));
        tokio::spawn(pump(cr, sw, c2s));
        tokio::spawn(pump(sr, cw, s2c));
    }
}

/// Copy `from` to `to`, appending everything to the file `log`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: PathBuf,
) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::create(&log).await?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        file.write_all(&buf[..n]).await?;
        to.write_all(&buf[..n]).await?;
    }
}

fn recordings(dir: &Path, suffix: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == suffix))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

/// Frames of a recorded replication stream, each with its encoded bytes.
fn frames_of(stream: &[u8]) -> Vec<(Frame, &[u8])> {
    let mut rest = stream;
    let mut out = Vec::new();
    while let Ok(Some((frame, used))) = decode_frame(rest) {
        out.push((frame, &rest[..used]));
        rest = &rest[used..];
    }
    out
}

fn write_seed(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn seeds(replication: &Path, nbd: &Path, corpus: &Path) -> anyhow::Result<()> {
    let mut counts = [0usize; 4];
    // Replication: every kind of frame both ways, and runs of consecutive frames.
    let mut streams = recordings(replication, "c2s")?;
    streams.extend(recordings(replication, "s2c")?);
    let mut seen_kinds = std::collections::BTreeSet::new();
    for (i, stream) in streams.iter().enumerate() {
        let frames = frames_of(stream);
        for (j, (frame, bytes)) in frames.iter().enumerate() {
            let kind = frame.msg.kind();
            let compressed = frame.payload.is_compressed();
            if bytes.len() <= SEED_BYTES_MAX && seen_kinds.insert((kind, compressed)) {
                write_seed(
                    &corpus.join("frame"),
                    &format!("rec-{i}-{j}-kind{kind}"),
                    bytes,
                )?;
                counts[0] += 1;
            }
        }
        // A run of the first small frames (handshake, resync start, first writes).
        let mut run = Vec::new();
        for (_, bytes) in &frames {
            if run.len() + bytes.len() > SEED_BYTES_MAX {
                break;
            }
            run.extend_from_slice(bytes);
        }
        if !run.is_empty() {
            write_seed(&corpus.join("frame"), &format!("rec-{i}-run"), &run)?;
            counts[0] += 1;
        }
        // The secondary engine: the frames the primary sent, as the target
        // encodes them (a 64 MiB volume and a 1 GiB journal, as recorded), each
        // followed by the completion of the journal sync and checkpoint it asked
        // for, and a tick every 8 frames.
        let mut records = vec![0x43u8, 0];
        let mut expected = 1u64;
        let mut part = 0;
        for (k, (frame, _)) in frames.iter().enumerate() {
            let payload_len = u64::from(frame.payload.raw_len());
            let Some(f) = tandem_fuzz::secondary::frame_of(frame.seq, &frame.msg, payload_len)
            else {
                continue;
            };
            records.extend(tandem_fuzz::secondary::encode_frame(&f, expected));
            records.extend([0x07, 0x08]);
            if k % 8 == 0 {
                records.extend([0x0a, 0x10]);
            }
            use tandem_fuzz::secondary::Frame;
            match f {
                Frame::ResyncStart { seq, .. } => expected = seq.max(expected),
                Frame::Write { seq, .. }
                | Frame::Zeroes { seq, .. }
                | Frame::Trim { seq, .. }
                | Frame::HashCheck { seq, .. } => expected = seq + 1,
                Frame::Flush { .. } | Frame::ResyncDone { .. } => {}
            }
            if records.len() > 4096 {
                write_seed(
                    &corpus.join("secondary"),
                    &format!("rec-{i}-{part}"),
                    &records,
                )?;
                counts[1] += 1;
                part += 1;
                records.truncate(2);
                break;
            }
        }
        if records.len() > 2 {
            write_seed(
                &corpus.join("secondary"),
                &format!("rec-{i}-{part}"),
                &records,
            )?;
            counts[1] += 1;
        }
    }
    // NBD: the client's bytes; the option phase and the request phase apart.
    for (i, stream) in recordings(nbd, "c2s")?.iter().enumerate() {
        let Some((options_end, options)) = option_phase(stream) else {
            continue;
        };
        // Mode byte 0: TLS off, writable export.
        let mut seed = vec![0u8];
        seed.extend_from_slice(&stream[..options_end]);
        write_seed(&corpus.join("nbd_option"), &format!("rec-{i}"), &seed)?;
        counts[2] += 1;
        let requests = &stream[options_end..];
        let cut = requests.len().min(SEED_BYTES_MAX);
        // Shape byte 10: a 1 GiB export; the session byte says what the
        // client negotiated (the server grants all of these).
        let extended = options.contains(&11);
        let structured = options.contains(&8);
        let contexts = u8::from(options.contains(&10));
        let session = u8::from(extended) | u8::from(structured) << 2 | contexts << 3;
        let mut seed = vec![10u8, session];
        seed.extend_from_slice(&requests[..cut]);
        write_seed(&corpus.join("nbd_request"), &format!("rec-{i}"), &seed)?;
        counts[3] += 1;
    }
    if counts.contains(&0) {
        bail!("some target got no seed (frame, secondary, nbd_option, nbd_request): {counts:?}");
    }
    println!(
        "seeds written: frame {}, secondary {}, nbd_option {}, nbd_request {}",
        counts[0], counts[1], counts[2], counts[3]
    );
    Ok(())
}

/// Length of the option phase of a recorded NBD client stream (client flags,
/// then options until NBD_OPT_GO or NBD_OPT_EXPORT_NAME) and the options sent.
fn option_phase(stream: &[u8]) -> Option<(usize, Vec<u32>)> {
    let mut at = 4;
    let mut options = Vec::new();
    loop {
        let head = stream.get(at..at + 16)?;
        let option = u32::from_be_bytes(head[8..12].try_into().ok()?);
        let len = u32::from_be_bytes(head[12..16].try_into().ok()?) as usize;
        at += 16 + len;
        options.push(option);
        if option == 7 || option == 1 {
            return (at <= stream.len()).then_some((at, options));
        }
    }
}
