//! The NBD client against `qemu-nbd`, a server nobody here wrote.
//!
//! Every test starts its own `qemu-nbd` on a temporary raw image and kills it
//! on drop, even when the test fails. `qemu-nbd` must be installed; a missing
//! binary fails the test; it never passes without running.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tandem::nbd::client::{
    NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
    NbdClient, NbdClientError,
};

const IMAGE_LEN_BYTES: u64 = 16 * 1024 * 1024;

/// A running `qemu-nbd`, killed when dropped.
struct QemuNbd {
    child: Child,
    addr: String,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Listen {
    Tcp,
    Unix,
}

fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Starts qemu-nbd on a fresh zero-filled image and waits until it accepts
/// connections.
fn start_qemu_nbd(listen: Listen, export_name: Option<&str>) -> QemuNbd {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let file = std::fs::File::create(&image).expect("create image");
    file.set_len(IMAGE_LEN_BYTES).expect("size image");
    drop(file);

    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "--persistent",
        "--format=raw",
        "--shared=8",
        "--discard=unmap",
    ]);
    let (addr, probe): (String, Box<dyn Fn() -> bool>) = match listen {
        Listen::Tcp => {
            let port = free_tcp_port();
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
            let addr = format!("127.0.0.1:{port}");
            let probe_addr = addr.clone();
            (
                addr,
                Box::new(move || std::net::TcpStream::connect(&probe_addr).is_ok()),
            )
        }
        Listen::Unix => {
            let socket = dir.path().join("nbd.sock");
            cmd.arg("--socket").arg(&socket);
            let addr = format!("unix:{}", socket.display());
            (
                addr,
                Box::new(move || std::os::unix::net::UnixStream::connect(&socket).is_ok()),
            )
        }
    };
    if let Some(name) = export_name {
        cmd.args(["--export-name", name]);
    }
    cmd.arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .expect("spawn qemu-nbd (install the qemu-utils package)");
    let mut server = QemuNbd {
        child,
        addr,
        image,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.child.try_wait().expect("poll qemu-nbd") {
            panic!("qemu-nbd exited early with {status}");
        }
        if probe() {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not listen on {} within 10 s",
            server.addr
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn random_bytes(rng: &mut rand::rngs::StdRng, len_bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; len_bytes];
    rng.fill(&mut v[..]);
    v
}

/// Writes `data` through the client and into the model of the image.
async fn write_and_model(
    client: &NbdClient,
    model: &mut [u8],
    offset: u64,
    data: Vec<u8>,
    fua: bool,
) {
    let start = offset as usize;
    model[start..start + data.len()].copy_from_slice(&data);
    client
        .write(offset, Bytes::from(data), fua)
        .await
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
}

async fn assert_reads(client: &NbdClient, model: &[u8], offset: u64, len_bytes: u32) {
    let got = client
        .read(offset, len_bytes)
        .await
        .unwrap_or_else(|e| panic!("read at {offset}: {e}"));
    let start = offset as usize;
    assert_eq!(got.len(), len_bytes as usize);
    assert!(
        got[..] == model[start..start + len_bytes as usize],
        "data read at offset {offset} length {len_bytes} differs from what was written"
    );
}

fn assert_image_file_matches(image: &Path, model: &[u8]) {
    let on_disk = std::fs::read(image).expect("read image file");
    assert_eq!(on_disk.len(), model.len());
    if let Some(first) = on_disk.iter().zip(model).position(|(a, b)| a != b) {
        panic!("image file differs from the expected contents first at byte {first}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_round_trips_zeroes_trim_flush_reach_the_image_file() {
    let server = start_qemu_nbd(Listen::Tcp, None);
    let client = NbdClient::connect(&server.addr, "").await.expect("connect");
    assert_eq!(client.size_bytes(), IMAGE_LEN_BYTES);
    let flags = client.transmission_flags();
    for (flag, name) in [
        (NBD_FLAG_SEND_FLUSH, "SEND_FLUSH"),
        (NBD_FLAG_SEND_FUA, "SEND_FUA"),
        (NBD_FLAG_SEND_TRIM, "SEND_TRIM"),
        (NBD_FLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
    ] {
        assert!(
            flags & flag != 0,
            "qemu-nbd should advertise {name}: {flags:#x}"
        );
    }
    let preferred = client
        .block_size_preferred()
        .expect("qemu-nbd answers NBD_INFO_BLOCK_SIZE");
    assert!(preferred.is_power_of_two());

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e62_6431);
    let mut model = vec![0u8; IMAGE_LEN_BYTES as usize];

    // Aligned write and read back.
    let data = random_bytes(&mut rng, 8192);
    write_and_model(&client, &mut model, 4096, data, false).await;
    assert_reads(&client, &model, 4096, 8192).await;
    // Unaligned offset and length, with FUA, overlapping the aligned write.
    let data = random_bytes(&mut rng, 777);
    write_and_model(&client, &mut model, 12_345, data, true).await;
    assert_reads(&client, &model, 12_345, 777).await;
    assert_reads(&client, &model, 0, 16_384).await;
    assert_reads(&client, &model, 12_340, 800).await;
    // Last bytes of the export.
    let data = random_bytes(&mut rng, 1000);
    write_and_model(&client, &mut model, IMAGE_LEN_BYTES - 1000, data, false).await;
    assert_reads(&client, &model, IMAGE_LEN_BYTES - 1000, 1000).await;

    // write_zeroes in the middle of written data leaves the neighbours alone.
    let data = random_bytes(&mut rng, 65_536);
    write_and_model(&client, &mut model, 1 << 20, data, false).await;
    client
        .write_zeroes((1 << 20) + 4096, 8192, false)
        .await
        .expect("write_zeroes");
    model[(1 << 20) + 4096..(1 << 20) + 4096 + 8192].fill(0);
    assert_reads(&client, &model, 1 << 20, 65_536).await;
    client
        .write_zeroes((1 << 20) + 100, 50, true)
        .await
        .expect("unaligned write_zeroes with fua");
    model[(1 << 20) + 100..(1 << 20) + 150].fill(0);
    assert_reads(&client, &model, 1 << 20, 65_536).await;

    // trim: qemu-nbd --discard=unmap punches a hole, which reads as zeroes.
    let data = random_bytes(&mut rng, 262_144);
    write_and_model(&client, &mut model, 4 << 20, data, false).await;
    assert_reads(&client, &model, 4 << 20, 262_144).await;
    client.trim(4 << 20, 131_072).await.expect("trim");
    model[(4 << 20)..(4 << 20) + 131_072].fill(0);
    let got = client.read(4 << 20, 131_072).await.expect("read trimmed");
    assert!(
        got.iter().all(|&b| b == 0),
        "trimmed range should read as zeroes"
    );
    assert_reads(&client, &model, 4 << 20, 262_144).await;

    client.flush().await.expect("flush");
    client.disconnect().await.expect("disconnect");
    assert_image_file_matches(&server.image, &model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_writers_share_one_connection() {
    const WRITERS: u64 = 32;
    const CHUNK_LEN_BYTES: u64 = 65_536;
    let server = start_qemu_nbd(Listen::Tcp, None);
    let client = NbdClient::connect(&server.addr, "").await.expect("connect");
    let mut rng = rand::rngs::StdRng::seed_from_u64(32);
    let mut model = vec![0u8; IMAGE_LEN_BYTES as usize];

    // Distinct, interleaved ranges: writer i owns chunk 2i + 1.
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let offset = (2 * i + 1) * CHUNK_LEN_BYTES;
        let data = random_bytes(&mut rng, CHUNK_LEN_BYTES as usize);
        model[offset as usize..(offset + CHUNK_LEN_BYTES) as usize].copy_from_slice(&data);
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.write(offset, Bytes::from(data), false).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        task.await
            .expect("writer task panicked")
            .unwrap_or_else(|e| panic!("writer {i}: {e}"));
    }

    // 32 concurrent readers, each reading a writer's chunk plus its neighbours.
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let offset = 2 * i * CHUNK_LEN_BYTES;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            (
                offset,
                client.read(offset, 3 * CHUNK_LEN_BYTES as u32).await,
            )
        }));
    }
    for task in tasks {
        let (offset, result) = task.await.expect("reader task panicked");
        let got = result.unwrap_or_else(|e| panic!("read at {offset}: {e}"));
        let start = offset as usize;
        assert!(
            got[..] == model[start..start + got.len()],
            "concurrent read at {offset} differs from what was written"
        );
    }

    client.flush().await.expect("flush");
    client.disconnect().await.expect("disconnect");
    assert_image_file_matches(&server.image, &model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_end_get_server_errors_and_the_connection_survives() {
    let server = start_qemu_nbd(Listen::Tcp, None);
    let client = NbdClient::connect(&server.addr, "").await.expect("connect");
    let size = client.size_bytes();

    match client.read(size - 512, 4096).await {
        Err(NbdClientError::Server {
            errno, op, offset, ..
        }) => {
            assert_ne!(errno, 0);
            assert_eq!(op, "read");
            assert_eq!(offset, size - 512);
        }
        other => panic!("read beyond the end should be a server error, got {other:?}"),
    }
    match client.write(size, Bytes::from(vec![7u8; 512]), false).await {
        Err(NbdClientError::Server { errno, op, .. }) => {
            assert_ne!(errno, 0);
            assert_eq!(op, "write");
        }
        other => panic!("write beyond the end should be a server error, got {other:?}"),
    }
    // The error reply carried no payload, so the stream is still in sync.
    client
        .write(0, Bytes::from_static(b"still alive"), false)
        .await
        .expect("write after errors");
    let got = client.read(0, 11).await.expect("read after errors");
    assert_eq!(&got[..], b"still alive");
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_export_name_is_refused_with_a_clear_error() {
    let server = start_qemu_nbd(Listen::Tcp, Some("tandem-vol"));
    let err = NbdClient::connect(&server.addr, "no-such-export")
        .await
        .expect_err("a wrong export name must not connect");
    match &err {
        NbdClientError::ExportNotFound { export_name, .. } => {
            assert_eq!(export_name, "no-such-export");
        }
        other => panic!("expected ExportNotFound, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("no-such-export") && message.contains("check the export name"),
        "unhelpful message: {message}"
    );

    let client = NbdClient::connect(&server.addr, "tandem-vol")
        .await
        .expect("the right name connects");
    assert_eq!(client.export_name(), "tandem-vol");
    assert_eq!(client.size_bytes(), IMAGE_LEN_BYTES);
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_addresses_work_with_and_without_prefix() {
    let server = start_qemu_nbd(Listen::Unix, None);
    let client = NbdClient::connect(&server.addr, "")
        .await
        .expect("connect unix:");
    let mut model = vec![0u8; IMAGE_LEN_BYTES as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let data = random_bytes(&mut rng, 5000);
    write_and_model(&client, &mut model, 3 * 4096 + 17, data, false).await;
    client.flush().await.expect("flush");
    client.disconnect().await.expect("disconnect");

    let bare_path = server.addr.strip_prefix("unix:").expect("unix address");
    let client = NbdClient::connect(bare_path, "")
        .await
        .expect("connect by bare path");
    assert_reads(&client, &model, 3 * 4096, 8192).await;
    client.disconnect().await.expect("disconnect");
    assert_image_file_matches(&server.image, &model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_fail_cleanly_after_disconnect() {
    let server = start_qemu_nbd(Listen::Tcp, None);
    let client = NbdClient::connect(&server.addr, "").await.expect("connect");
    let clone = client.clone();
    client.disconnect().await.expect("disconnect");
    match clone.read(0, 512).await {
        Err(NbdClientError::ConnectionLost { cause, .. }) => {
            assert!(matches!(*cause, NbdClientError::Disconnected), "{cause:?}");
        }
        other => panic!("read after disconnect should fail, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_closed_port_names_the_address() {
    let port = free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    match NbdClient::connect(&addr, "").await {
        Err(e @ NbdClientError::Connect { .. }) => {
            assert!(e.to_string().contains(&addr), "{e}");
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

/// tandem's client with structured replies, extended headers and block status
/// against qemu-nbd (10.x negotiates extended headers when asked): reads of
/// holes arrive as hole chunks, data as data chunks, and `base:allocation`
/// tells the written ranges from the holes of the sparse image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_and_extended_replies_and_block_status_from_qemu_nbd() {
    use tandem::nbd::client::ClientOptions;
    use tandem::nbd::proto::{HeaderStyle, ReplyStyle};
    let server = start_qemu_nbd(Listen::Tcp, None);
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for extended in [false, true] {
        let client = NbdClient::connect_with(
            &server.addr,
            ClientOptions {
                structured: true,
                extended,
                meta_contexts: vec!["base:allocation".into(), "qemu:nope".into()],
                ..ClientOptions::default()
            },
        )
        .await
        .expect("connect");
        let n = client.negotiated().clone();
        assert_eq!(n.style == HeaderStyle::Extended, extended, "{n:?}");
        assert_eq!(
            n.reply,
            if extended {
                ReplyStyle::Extended
            } else {
                ReplyStyle::Structured
            }
        );
        assert_eq!(n.contexts.len(), 1, "{n:?}");
        let data = random_bytes(&mut rng, 65536);
        client
            .write(4 << 20, Bytes::from(data.clone()), true)
            .await
            .unwrap();
        // A read across data and hole comes back whole, holes as zeroes.
        let got = client.read((4 << 20) - 65536, 3 * 65536).await.unwrap();
        assert!(got[..65536].iter().all(|b| *b == 0));
        assert_eq!(&got[65536..131072], &data[..]);
        assert!(got[131072..].iter().all(|b| *b == 0));
        let map = client
            .block_status("base:allocation", 0, IMAGE_LEN_BYTES)
            .await
            .unwrap();
        let mut at = 0u64;
        let mut data_ranges = Vec::new();
        for e in &map {
            if e.flags & 1 == 0 {
                data_ranges.push((at, at + e.len));
            }
            at += e.len;
        }
        assert!(at <= IMAGE_LEN_BYTES && !map.is_empty());
        assert!(
            data_ranges
                .iter()
                .any(|&(s, e)| s <= 4 << 20 && e >= (4 << 20) + 65536),
            "written range not reported as data: {map:?}"
        );
        assert!(
            !data_ranges.iter().any(|&(s, _)| s < 1 << 20),
            "the first MiB was never written: {map:?}"
        );
        client.disconnect().await.unwrap();
    }
}
