//! The frame decoder: `decode_frame` (sync), `decode_frame_split` (the
//! compressed stream's receive buffer) and `read_frame` (the agents' plain path)
//! must accept exactly the same frames from a byte stream, a decoded frame must
//! re-encode to one that decodes equal, and opening a payload (decompression,
//! crc) must stay within the announced length.

use bytes::BytesMut;
use tandem::wire::{
    Frame, HEADER_LEN, PAYLOAD_MAX_BYTES, WireError, decode_frame, decode_frame_split,
    encode_frame, read_frame,
};

/// At most this many frames per input (inputs are small; this bounds time).
const FRAMES_MAX: usize = 64;

fn same(a: &Frame, b: &Frame) -> bool {
    a.seq == b.seq
        && a.msg == b.msg
        && a.payload.raw_len() == b.payload.raw_len()
        && a.payload.wire_len() == b.payload.wire_len()
        && a.payload.crc32() == b.payload.crc32()
        && a.payload.is_compressed() == b.payload.is_compressed()
}

fn check(frame: &Frame) {
    // Re-encoding a decoded frame gives a frame that decodes equal.
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    let (again, used) = decode_frame(&buf)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is whole");
    assert_eq!(used, buf.len());
    assert!(same(frame, &again), "{frame:?} != {again:?}");
    // Opening the payload never yields more than announced, whatever the bytes.
    if let Ok(data) = frame.payload.clone().open() {
        assert_eq!(data.len(), frame.payload.raw_len() as usize);
        assert!(data.len() <= PAYLOAD_MAX_BYTES as usize);
    }
}

pub fn run(data: &[u8]) {
    let mut rest = data;
    let mut decoded = Vec::new();
    let end: Result<(), WireError> = loop {
        if decoded.len() == FRAMES_MAX {
            break Ok(());
        }
        match decode_frame(rest) {
            Ok(Some((frame, used))) => {
                assert!(used >= HEADER_LEN && used <= rest.len());
                check(&frame);
                rest = &rest[used..];
                decoded.push(frame);
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // The stream decoder splits frames off its buffer: the same frames, with the
    // same payload bytes, and the same refusal.
    let mut buf = BytesMut::from(data);
    for expected in &decoded {
        let got = decode_frame_split(&mut buf)
            .expect("decode_frame_split refuses what decode_frame accepts")
            .expect("decode_frame_split sees a whole frame");
        assert!(same(expected, &got), "{expected:?} != {got:?}");
        let (a, b) = (expected.payload.clone().open(), got.payload.open());
        assert_eq!(a.ok(), b.ok(), "the payloads open differently");
    }
    if decoded.len() < FRAMES_MAX {
        let next = decode_frame_split(&mut buf);
        assert_eq!(
            next.is_err(),
            end.is_err(),
            "decode_frame_split ended with {next:?}"
        );
        assert!(matches!(next, Ok(None) | Err(_)));
    }
    // The agents read with read_frame: it must see the same frames.
    let mut reader = data;
    let mut scratch = BytesMut::new();
    for expected in &decoded {
        let got = crate::poll_ready(read_frame(&mut reader, &mut scratch))
            .unwrap_or_else(|e| panic!("read_frame refuses what decode_frame accepts: {e}"));
        assert!(same(expected, &got), "{expected:?} != {got:?}");
    }
    if decoded.len() < FRAMES_MAX {
        let next = crate::poll_ready(read_frame(&mut reader, &mut scratch));
        match (&end, next) {
            // Both refuse the same bytes (the error may be worded from what each saw).
            (Err(_), Err(_)) => {}
            // An incomplete frame: read_frame fails too, with whatever it met
            // first (the end of the stream, or a bad body before the payload).
            (Ok(()), Err(_)) => {}
            (end, Ok(f)) => panic!("decode_frame ended with {end:?}, read_frame accepted {f:?}"),
        }
    }
}
