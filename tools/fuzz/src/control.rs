//! The control socket's input: bytes cut into lines by
//! `control::LineSplitter` (in chunks chosen by the input), each decoded by
//! `control::decode_request`. Checks that the splitter never holds more than
//! the line limit, that it cuts exactly where a plain split on `\n` would
//! (lines over the limit refused), and that a decoded request re-encodes to
//! one that decodes equal.

use tandem::agent::control::{
    CONTROL_LINE_MAX_BYTES, ControlRequest, LineEvent, LineSplitter, decode_request,
};

use crate::Input;

/// The limit used here: small, so the fuzzer reaches it with short inputs.
/// The production limit is checked by `decode_request` on each line.
const LIMIT_BYTES: usize = 64;

fn reference(data: &[u8]) -> Vec<LineEvent> {
    let mut out = Vec::new();
    let mut parts: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    // The last part has no newline: a line only if not empty.
    let last = parts.pop().expect("split yields at least one part");
    for p in parts {
        out.push(if p.len() > LIMIT_BYTES {
            LineEvent::TooLong
        } else {
            LineEvent::Line(p.to_vec())
        });
    }
    if last.len() > LIMIT_BYTES {
        out.push(LineEvent::TooLong);
    } else if !last.is_empty() {
        out.push(LineEvent::Line(last.to_vec()));
    }
    out
}

fn same_request(a: &ControlRequest, b: &ControlRequest) -> bool {
    a.cmd == b.cmd && a.resource == b.resource && same_value(&a.args, &b.args)
}

/// JSON values equal, floats within an ulp or so: serde_json's default float
/// parser may round the last bit differently after a round trip (found by this
/// target: 1.0485048585085049e27 came back as ...048e27). Control commands
/// take integers, booleans and strings only, so this never matters to an agent.
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs())
        }
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    // The first byte picks the chunk size the bytes arrive in.
    let Some(chunk) = input.u8() else { return };
    let chunk = usize::from(chunk % 32) + 1;
    let bytes = input.rest();
    let mut splitter = LineSplitter::new(LIMIT_BYTES);
    let mut events = Vec::new();
    for piece in bytes.chunks(chunk) {
        splitter.push(piece, &mut events);
        assert!(splitter.held_bytes() <= LIMIT_BYTES);
    }
    splitter.finish(&mut events);
    assert_eq!(events, reference(bytes));
    for e in &events {
        let LineEvent::Line(line) = e else { continue };
        if let Ok(req) = decode_request(line) {
            let text = serde_json::to_string(&req).expect("a request serializes");
            assert!(text.len() <= CONTROL_LINE_MAX_BYTES * 6 + 64);
            let again = decode_request(text.as_bytes()).expect("a re-encoded request decodes");
            assert!(same_request(&req, &again), "{req:?} != {again:?}");
        }
    }
    // The whole input as one line, at the production limit.
    if let Ok(req) = decode_request(bytes) {
        let _ = (req.flag("follow"), req.number("since"), req.text("x"));
    }
}
