//! Every committed seed and every input that once crashed a target, replayed
//! through its target in the normal test suite (no libFuzzer needed): a crash
//! found by fuzzing stays fixed. Inputs live in `corpus/TARGET/` (seeds
//! recorded from real traffic) and `regressions/TARGET/` (crashes, named after
//! what they found).

use std::path::Path;

fn replay(dir: &Path, run: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{} crashes its target", path.display());
    }
    files.len()
}

#[test]
fn every_seed_and_regression_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, run) in tandem_fuzz::TARGETS {
        let seeds = replay(&root.join("corpus").join(name), run);
        let regressions = replay(&root.join("regressions").join(name), run);
        println!("{name}: {seeds} seeds, {regressions} regression inputs");
        assert!(seeds > 0, "target {name} has no committed seed corpus");
    }
}

#[test]
fn empty_and_tiny_inputs_are_harmless() {
    for (_, run) in tandem_fuzz::TARGETS {
        run(&[]);
        for b in 0..=255u8 {
            run(&[b]);
            run(&[b, b, b, b]);
        }
    }
}
