//! Engine tests fed synthetic events (no sockets, no files). Each bug of issue 9
//! that lives in the primary engine has a test here named after the scenario.

use super::*;

const BS: u64 = 4096;

type E = PrimaryEngine<u32, Vec<u8>>;
type Out = Vec<Action<u32, Vec<u8>>>;

fn cfg(mode: Mode, blocks: u64) -> Config {
    let mut c = Config::new(mode, blocks * BS, BS as u32);
    c.resync_chunk_bytes = 4 * BS;
    c
}

fn engine(c: Config) -> E {
    let dirty = DirtyBitmap::for_volume(c.size_bytes, c.block_size);
    PrimaryEngine::new(c, dirty, Seq(1))
}

fn connected(c: Config) -> (E, Out) {
    let mut e = engine(c);
    let mut out = Vec::new();
    e.session_started(false, &mut out);
    (e, out)
}

fn write(e: &mut E, block: u64, blocks: u64, fua: bool, token: u32, out: &mut Out) -> Seq {
    let seq = e.next_seq();
    e.submit(
        OpKind::Write,
        ByteRange::new(block * BS, blocks * BS),
        fua,
        Some(vec![token as u8]),
        token,
        0,
        out,
    );
    seq
}

fn started(out: &Out) -> Vec<(Seq, OpKind, ByteRange)> {
    out.iter()
        .filter_map(|a| match a {
            Action::StartLocal {
                seq, kind, range, ..
            } => Some((*seq, *kind, *range)),
            _ => None,
        })
        .collect()
}

fn completed(out: &Out) -> Vec<(u32, Result<(), Errno>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Complete { token, result } => Some((*token, *result)),
            _ => None,
        })
        .collect()
}

fn shipped_seqs(out: &Out) -> Vec<Seq> {
    out.iter()
        .filter_map(|a| match a {
            Action::Ship(
                Outgoing::Write { seq, .. }
                | Outgoing::Zeroes { seq, .. }
                | Outgoing::Trim { seq, .. }
                | Outgoing::HashCheck { seq, .. },
            ) => Some(*seq),
            _ => None,
        })
        .collect()
}

fn resync_done(out: &Out) -> Option<Seq> {
    out.iter().find_map(|a| match a {
        Action::Ship(Outgoing::ResyncDone { through }) => Some(*through),
        _ => None,
    })
}

fn dropped(out: &Out) -> bool {
    out.iter().any(|a| matches!(a, Action::DropSession { .. }))
}

/// Complete every started local op (reads return data) and every local flush.
fn settle_local(e: &mut E, out: &mut Out) {
    loop {
        let pending: Vec<Action<u32, Vec<u8>>> = std::mem::take(out);
        let mut any = false;
        for a in pending {
            match a {
                Action::StartLocal { seq, kind, .. } if kind.is_client() => {
                    any = true;
                    e.local_done(seq, Ok(()), out);
                }
                Action::StartLocal { seq, kind, .. } => {
                    any = true;
                    let r = if kind == OpKind::ResyncRead {
                        ReadResult::Data(vec![1])
                    } else {
                        ReadResult::Hashes(vec![2])
                    };
                    e.read_done(seq, Ok(r), out);
                }
                Action::StartLocalFlush { id } => {
                    any = true;
                    e.local_flush_done(id, Ok(()), out);
                }
                Action::WriteActivityLog { .. } => {
                    any = true;
                    e.activity_written(Ok(()), out);
                }
                Action::PersistBitmap { .. } => {
                    any = true;
                    e.bitmap_persisted(Ok(()), out);
                }
                other => out.push(other),
            }
        }
        if !any {
            return;
        }
    }
}

#[test]
fn sync_write_completes_only_after_applied_and_fua_only_after_durable() {
    let (mut e, mut out) = connected(cfg(Mode::Sync, 64));
    let s1 = write(&mut e, 0, 1, false, 1, &mut out);
    let s2 = write(&mut e, 2, 1, true, 2, &mut out);
    settle_local(&mut e, &mut out);
    assert!(
        completed(&out).is_empty(),
        "nothing completes before the peer: {out:?}"
    );
    out.clear();
    e.peer_applied(s1, &mut out);
    e.peer_applied(s2, &mut out);
    assert_eq!(
        completed(&out),
        vec![(1, Ok(()))],
        "the FUA write waits for Durable (G1)"
    );
    out.clear();
    e.peer_durable(s2, &mut out);
    assert_eq!(completed(&out), vec![(2, Ok(()))]);
    e.assert_invariants();
}

#[test]
fn sync_writes_complete_locally_when_the_peer_goes_away_in_degrade_mode() {
    let (mut e, mut out) = connected(cfg(Mode::Sync, 64));
    write(&mut e, 0, 1, false, 7, &mut out);
    settle_local(&mut e, &mut out);
    out.clear();
    e.session_ended(&mut out);
    assert_eq!(completed(&out), vec![(7, Ok(()))]);
    assert!(e.dirty().is_dirty(BlockIndex(0)), "tracked for resync (G3)");
    e.assert_invariants();
}

/// Issue 9 #6: with `on-disconnect = block`, a sync write in flight when the link
/// drops must not complete as success, and new writes wait for the peer; both
/// complete once the secondary holds them again.
#[test]
fn block_mode_keeps_sync_writes_and_flushes_until_the_secondary_is_back_in_sync() {
    let mut c = cfg(Mode::Sync, 64);
    c.peer_loss = PeerLoss::Block;
    let (mut e, mut out) = connected(c);
    write(&mut e, 0, 1, false, 1, &mut out);
    settle_local(&mut e, &mut out);
    out.clear();
    e.session_ended(&mut out);
    settle_local(&mut e, &mut out);
    assert!(completed(&out).is_empty(), "in-flight write held: {out:?}");
    e.flush(2, 0, &mut out);
    write(&mut e, 4, 1, false, 3, &mut out);
    settle_local(&mut e, &mut out);
    assert!(
        completed(&out).is_empty(),
        "flush and new write wait: {out:?}"
    );
    assert_eq!(e.parked(), 1);
    out.clear();
    e.session_started(false, &mut out);
    settle_local(&mut e, &mut out);
    e.tick(10, &mut out);
    settle_local(&mut e, &mut out);
    // The parked write ships now, its resync of block 0 too.
    let last = Seq(e.next_seq().0 - 1);
    for s in shipped_seqs(&out) {
        e.peer_applied(s, &mut out);
    }
    assert!(
        !completed(&out).iter().any(|(t, _)| *t == 1 || *t == 2),
        "block 0 is not on the secondary before the resync is durable: {out:?}"
    );
    e.peer_durable(last, &mut out);
    e.tick(20, &mut out);
    let through = resync_done(&out).expect("the pass ends with ResyncDone");
    e.peer_durable(through, &mut out);
    e.peer_section_done(through, &mut out);
    let mut done: Vec<u32> = completed(&out).iter().map(|(t, _)| *t).collect();
    done.sort();
    assert_eq!(
        done,
        vec![1, 2, 3],
        "held write and flush complete once in sync: {out:?}"
    );
    e.assert_invariants();
}

/// Issue 9 #3: a poisoned primary refuses writes without assigning a seq, also
/// while connected (it used to panic in the shipper).
#[test]
fn a_poisoned_primary_refuses_writes_while_connected_without_panicking() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    e.poison("test".into(), &mut out);
    let before = e.next_seq();
    write(&mut e, 0, 1, false, 1, &mut out);
    e.tick(1, &mut out);
    assert_eq!(completed(&out), vec![(1, Err(libc::EIO))]);
    assert_eq!(e.next_seq(), before, "no seq for a refused write");
    e.assert_invariants();
}

/// Issue 9 #8: after a failed fdatasync every pending and later FLUSH fails, even
/// one whose own fdatasync reports success.
#[test]
fn a_failed_local_flush_fails_every_pending_and_later_flush() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    write(&mut e, 0, 1, false, 1, &mut out);
    settle_local(&mut e, &mut out);
    out.clear();
    e.flush(2, 0, &mut out);
    e.flush(3, 0, &mut out);
    let ids: Vec<LocalFlushId> = out
        .iter()
        .filter_map(|a| match a {
            Action::StartLocalFlush { id } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 1, "one fdatasync at a time");
    e.local_flush_done(ids[0], Err(libc::EIO), &mut out);
    let mut done = completed(&out);
    done.sort();
    assert_eq!(done, vec![(2, Err(libc::EIO)), (3, Err(libc::EIO))]);
    assert!(out.iter().any(|a| matches!(a, Action::Poisoned { .. })));
    out.clear();
    e.flush(4, 0, &mut out);
    assert_eq!(completed(&out), vec![(4, Err(libc::EIO))]);
    assert!(e.is_poisoned());
}

/// Issue 9 #2: a TRIM spanning more extents than the activity log holds is split
/// into pieces and completes; a write behind it is not stuck.
#[test]
fn a_trim_larger_than_the_activity_log_is_split_and_completes() {
    let blocks = 1024; // 4 MiB volume
    let mut c = cfg(Mode::Async, blocks);
    c.window_bytes_max = 1 << 30;
    let (mut e, mut out) = connected(c);
    // 16 KiB extents, 4 active at most: a whole-volume trim spans 256 extents.
    e.enable_activity(ActiveSet::new(4 * BS, 4));
    e.submit(
        OpKind::Trim,
        ByteRange::new(0, blocks * BS),
        false,
        None,
        1,
        0,
        &mut out,
    );
    write(&mut e, 3, 1, false, 2, &mut out);
    for _ in 0..1000 {
        settle_local(&mut e, &mut out);
        let ships = shipped_seqs(&out);
        if let Some(last) = ships.last() {
            e.peer_durable(*last, &mut out);
        }
        if completed(&out).len() == 2 {
            break;
        }
    }
    let mut done = completed(&out);
    done.sort();
    assert_eq!(done, vec![(1, Ok(())), (2, Ok(()))]);
    e.assert_invariants();
}

/// Issue 9 #1: when an extent retires, the bitmap persisted first covers the blocks
/// written locally but not yet flushed, even though the secondary has them durably:
/// a power loss of this node could undo them.
#[test]
fn retirement_persists_locally_volatile_blocks_even_when_durable_on_the_secondary() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    e.enable_activity(ActiveSet::new(4 * BS, 1));
    let s1 = write(&mut e, 0, 1, false, 1, &mut out);
    settle_local(&mut e, &mut out);
    e.peer_durable(s1, &mut out);
    assert!(e.dirty().dirty_count().0 == 0, "in sync with the secondary");
    out.clear();
    // A write to another extent retires extent 0.
    write(&mut e, 8, 1, false, 2, &mut out);
    let bitmap = out
        .iter()
        .find_map(|a| match a {
            Action::WriteActivityLog {
                bitmap: Some(bm), ..
            } => Some(bm.clone()),
            _ => None,
        })
        .expect("a retirement persists the bitmap first");
    assert!(
        bitmap.is_dirty(BlockIndex(0)),
        "block 0 is only in the page cache: after a power loss it may be older than the secondary's"
    );
    // Once a local flush covered it, a later retirement no longer needs it.
    settle_local(&mut e, &mut out);
    e.flush(3, 0, &mut out);
    settle_local(&mut e, &mut out);
    assert!(!e.persist_image().is_dirty(BlockIndex(0)));
}

/// Extents 0 and 1 written (only in the page cache) and durable on the secondary,
/// then extent 2 retires extent 0. Returns the retirement's bitmap pages.
fn retire_extent_0_of_two(e: &mut E, out: &mut Out) -> crate::bitmap::BitmapPages {
    e.enable_activity(ActiveSet::new(4 * BS, 2));
    write(e, 0, 1, false, 1, out);
    let s2 = write(e, 4, 1, false, 2, out);
    settle_local(e, out);
    e.peer_durable(s2, out);
    assert_eq!(e.dirty().dirty_count().0, 0, "in sync with the secondary");
    out.clear();
    write(e, 8, 1, false, 3, out);
    out.iter()
        .find_map(|a| match a {
            Action::WriteActivityLog {
                bitmap: Some(bm), ..
            } => Some(bm.clone()),
            _ => None,
        })
        .expect("a retirement persists the bitmap first")
}

/// Crash recovery compares the logged extents by hash: a retirement must not put
/// the volatile blocks of extents the log keeps covering into the persisted bitmap,
/// or a crash resends them as data and compares nothing (e2e_faults
/// primary_kill9_three_times: `verified_bytes` 0 after a crash).
#[test]
fn a_retirement_persists_only_volatile_blocks_the_log_stops_covering() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    let bitmap = retire_extent_0_of_two(&mut e, &mut out);
    assert!(
        bitmap.is_dirty(BlockIndex(0)),
        "extent 0 retires: block 0 may differ after a power loss"
    );
    assert!(
        !bitmap.is_dirty(BlockIndex(4)),
        "extent 1 stays in the log (durably recorded): block 4 is compared by hash after a crash"
    );
}

/// The activity-log writes in `out`: (listed extents, has pages, pages_with_record).
fn log_writes(out: &Out) -> Vec<(Vec<u32>, bool, bool)> {
    out.iter()
        .filter_map(|a| match a {
            Action::WriteActivityLog {
                active,
                bitmap,
                pages_with_record,
            } => Some((active.clone(), bitmap.is_some(), *pages_with_record)),
            _ => None,
        })
        .collect()
}

/// Issue 11: a record with room lists the extents it retires once more, so the
/// retirement's pages and the record can share one fdatasync (whichever a power
/// loss keeps covers extent 0); the next record drops them. Without room the
/// record lists only the active set and the pages go first (two fdatasyncs).
#[test]
fn a_retirement_record_lists_the_retired_extents_when_it_has_room() {
    for (record_max, together) in [(crate::meta::AL_EXTENTS_MAX, true), (2, false)] {
        let (mut e, mut out) = connected(cfg(Mode::Async, 64));
        e.enable_activity(ActiveSet::new(4 * BS, 2));
        e.set_activity_record_max(record_max);
        write(&mut e, 0, 1, false, 1, &mut out);
        let s2 = write(&mut e, 4, 1, false, 2, &mut out);
        settle_local(&mut e, &mut out);
        e.peer_durable(s2, &mut out);
        out.clear();
        // Extent 2 retires extent 0.
        write(&mut e, 8, 1, false, 3, &mut out);
        let w = log_writes(&out);
        assert_eq!(w.len(), 1, "one log write: {w:?}");
        let (listed, pages, with_record) = w[0].clone();
        assert!(pages, "the retirement persists extent 0's pages");
        assert_eq!(with_record, together, "record_max {record_max}");
        let want: &[u32] = if together { &[0, 1, 2] } else { &[1, 2] };
        assert_eq!(listed, want, "record_max {record_max}");
        settle_local(&mut e, &mut out);
        out.clear();
        // The next record (extent 3 retires extent 1) no longer lists extent 0.
        let s3 = Seq(3);
        e.peer_durable(s3, &mut out);
        write(&mut e, 12, 1, false, 4, &mut out);
        let w = log_writes(&out);
        assert_eq!(w.len(), 1, "one log write: {w:?}");
        assert!(!w[0].0.contains(&0), "extent 0 was dropped: {w:?}");
        e.assert_invariants();
    }
}

/// The volatile blocks a retirement persisted are cleared on disk once a local
/// flush covers them (a periodic persist), or every later crash resends them: the
/// persisted bitmap would grow toward every block ever written.
#[test]
fn volatile_blocks_a_retirement_persisted_are_cleared_after_a_local_flush() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    let c = e.cfg.clone();
    retire_extent_0_of_two(&mut e, &mut out);
    settle_local(&mut e, &mut out);
    // The background flush covers block 0, then the periodic persist runs.
    let mut now = 0;
    let mut persisted = None;
    for _ in 0..4 {
        now += c.local_flush_interval_ms.max(c.persist_interval_ms);
        e.tick(now, &mut out);
        for a in &out {
            if let Action::PersistBitmap { bitmap } = a {
                persisted = Some(bitmap.clone());
            }
        }
        settle_local(&mut e, &mut out);
    }
    let persisted = persisted.expect("a persist clears what the retirement marked");
    assert!(!persisted.is_dirty(BlockIndex(0)));
}

/// Issue 9 #5: ResyncDone is sent only once every comparison has been answered and
/// nothing is dirty; a mismatch is resent as data first.
#[test]
fn resync_done_waits_for_hash_answers_and_resends_mismatches_first() {
    let mut e = engine(cfg(Mode::Async, 8));
    e.mark_verify(BlockIndex(0), BlockIndex(8));
    let mut out = Vec::new();
    e.session_started(false, &mut out);
    settle_local(&mut e, &mut out);
    e.tick(0, &mut out);
    settle_local(&mut e, &mut out);
    let ships = shipped_seqs(&out);
    assert_eq!(ships.len(), 2, "two hash chunks of 4 blocks: {out:?}");
    assert!(resync_done(&out).is_none(), "not before the answers");
    out.clear();
    e.peer_hash_reply(ships[0], &[1], &mut out);
    e.peer_hash_reply(ships[1], &[], &mut out);
    e.peer_durable(ships[1], &mut out);
    assert!(!dropped(&out), "{out:?}");
    assert!(resync_done(&out).is_none(), "block 1 differs: {out:?}");
    assert_eq!(e.dirty().dirty_count().0, 1);
    e.tick(1, &mut out);
    let data: Vec<_> = started(&out)
        .into_iter()
        .filter(|(_, k, _)| *k == OpKind::ResyncRead)
        .collect();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0].2, ByteRange::new(BS, BS));
    settle_local(&mut e, &mut out);
    let last = *shipped_seqs(&out).last().unwrap();
    out.clear();
    e.peer_durable(last, &mut out);
    let through = resync_done(&out).expect("now in sync");
    e.peer_durable(through, &mut out);
    e.peer_section_done(through, &mut out);
    assert!(e.is_in_sync());
    e.assert_invariants();
}

#[test]
fn a_failed_resync_read_ends_the_session_and_keeps_the_blocks_dirty() {
    let mut e = engine(cfg(Mode::Async, 64));
    let mut out = Vec::new();
    e.session_started(true, &mut out);
    settle_local(&mut e, &mut out);
    e.tick(0, &mut out);
    let (seq, _, range) = started(&out)[0];
    out.clear();
    e.read_done(seq, Err(libc::EIO), &mut out);
    assert!(dropped(&out), "{out:?}");
    assert!(!e.is_streaming());
    assert!(e.dirty().is_dirty(range.blocks(BS as u32).0));
    assert_eq!(e.dirty().dirty_count().0, 64);
    e.assert_invariants();
}

#[test]
fn lag_age_survives_the_link_going_down_and_clears_once_resynced() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    e.submit(
        OpKind::Write,
        ByteRange::new(0, BS),
        false,
        Some(vec![1]),
        1,
        100,
        &mut out,
    );
    settle_local(&mut e, &mut out);
    assert_eq!(e.lag().oldest_accepted_at_ms, Some(100));
    e.session_ended(&mut out);
    e.tick(300, &mut out);
    assert_eq!(e.lag().writes, 0);
    assert_eq!(
        e.lag().oldest_accepted_at_ms,
        Some(100),
        "still the oldest change (G4)"
    );
    out.clear();
    e.session_started(false, &mut out);
    settle_local(&mut e, &mut out);
    e.tick(600, &mut out);
    settle_local(&mut e, &mut out);
    let last = *shipped_seqs(&out).last().unwrap();
    e.peer_durable(last, &mut out);
    e.tick(700, &mut out);
    assert_eq!(e.dirty().dirty_count().0, 0);
    assert_eq!(e.lag().oldest_accepted_at_ms, None);
    e.assert_invariants();
}

#[test]
fn a_durable_claim_beyond_what_was_shipped_drops_the_session() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    out.clear();
    e.peer_durable(Seq(99), &mut out);
    assert!(dropped(&out));
    assert!(!e.is_streaming());
}

/// G4 and issue 10: a full window sends the primary ahead once; while the resync
/// section that follows is open, another burst is held for room instead of going
/// ahead again, so the section ends.
#[test]
fn a_full_window_goes_ahead_once_then_holds_writes_until_the_section_ends() {
    let mut c = cfg(Mode::Async, 64);
    c.window_writes_max = 2;
    c.ahead_min_ms = 0;
    let (mut e, mut out) = connected(c);
    let s1 = write(&mut e, 0, 1, false, 1, &mut out);
    write(&mut e, 1, 1, false, 2, &mut out);
    write(&mut e, 2, 1, false, 3, &mut out);
    assert!(e.is_ahead(), "the third write does not fit");
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Note(Note::EnteredAhead { .. })))
    );
    settle_local(&mut e, &mut out);
    assert_eq!(completed(&out).len(), 3, "async: local completion");
    e.peer_durable(Seq(s1.0 + 1), &mut out);
    e.tick(10, &mut out);
    assert!(!e.is_ahead(), "drained: a resync pass starts");
    assert!(e.resync_progress().is_some());
    out.clear();
    // While the pass runs, a burst does not go ahead again.
    for i in 0..4 {
        write(&mut e, 10 + i, 1, false, 10 + i as u32, &mut out);
    }
    settle_local(&mut e, &mut out);
    assert!(!e.is_ahead());
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Note(Note::Throttling { .. })))
    );
    assert!(
        completed(&out).len() < 4,
        "held writes wait for room: {:?}",
        completed(&out)
    );
    e.assert_invariants();
}

/// A connected async engine over 64 blocks whose window holds two writes and
/// whose ahead episodes may end at once, against a peer staging `stage_bytes`.
fn two_write_window(stage_bytes: u64) -> (E, Out) {
    let mut c = cfg(Mode::Async, 64);
    c.window_writes_max = 2;
    c.ahead_min_ms = 0;
    let mut e = engine(c);
    let mut out = Vec::new();
    e.set_peer_stage_bytes(stage_bytes);
    e.session_started(false, &mut out);
    (e, out)
}

/// Issue 11: a secondary whose journal cannot stage a resync of the whole volume
/// (its Welcome says how much it can) would refuse a resync larger than that on
/// every reconnect. With such a peer a full window still goes ahead, but the
/// bitmap is held within the ahead budget (half of what the peer stages): a
/// request that would grow it further waits, parked in order, until the ahead
/// episode ends; writes to blocks already out of sync go on. A peer that stages
/// the whole volume has no budget.
#[test]
fn ahead_holds_the_bitmap_within_half_of_what_the_peer_stages() {
    // Volume 64 blocks; the peer stages 16 blocks: a budget of 8 blocks.
    let (mut e, mut out) = two_write_window(16 * BS);
    let s1 = write(&mut e, 0, 1, false, 1, &mut out);
    write(&mut e, 1, 1, false, 2, &mut out);
    // Ahead: 6 blocks in the bitmap, within the budget.
    write(&mut e, 10, 6, false, 3, &mut out);
    assert!(e.is_ahead(), "the third write goes ahead");
    // 2 more blocks: 8, exactly the budget.
    write(&mut e, 20, 2, false, 4, &mut out);
    // A 9th block waits, and so does every request after it, even one to a
    // block already out of sync (requests are admitted in order).
    write(&mut e, 30, 1, false, 5, &mut out);
    write(&mut e, 10, 1, false, 6, &mut out);
    assert_eq!(e.parked(), 2);
    let notes = |out: &Out| {
        out.iter()
            .filter(|a| matches!(a, Action::Note(Note::AheadBudgetFull { .. })))
            .count()
    };
    assert_eq!(notes(&out), 1, "noted once per episode");
    settle_local(&mut e, &mut out);
    let mut done: Vec<u32> = completed(&out).iter().map(|c| c.0).collect();
    done.sort();
    assert_eq!(
        done,
        vec![1, 2, 3, 4],
        "async: local completion within the budget"
    );
    assert_eq!(e.dirty().dirty_count().0, 8);
    out.clear();
    // The window drains: ahead ends, the pass starts and the parked requests join
    // its section (in the stream, after the resync's start).
    e.peer_durable(Seq(s1.0 + 1), &mut out);
    e.tick(10, &mut out);
    assert!(!e.is_ahead());
    assert!(e.resync_progress().is_some());
    assert_eq!(e.parked(), 0, "admitted when the pass starts");
    settle_local(&mut e, &mut out);
    let done: Vec<u32> = completed(&out).iter().map(|c| c.0).collect();
    assert_eq!(done, vec![5, 6], "the parked writes complete once admitted");
    e.assert_invariants();

    // A peer that stages the whole volume: no budget.
    let (mut e, mut out) = two_write_window(64 * BS);
    write(&mut e, 0, 1, false, 1, &mut out);
    write(&mut e, 1, 1, false, 2, &mut out);
    write(&mut e, 2, 60, false, 3, &mut out);
    assert!(e.is_ahead());
    assert_eq!(e.parked(), 0);
    assert_eq!(notes(&out), 0);
    e.assert_invariants();
}

/// Found in session 23 (e2e_spill::client_writes_joining_a_resync_never_overflow_
/// what_the_secondary_stages): the secondary holds a section, the resync and the
/// client ops that join it, until it ends, and stages at most what its Welcome
/// said. Client writes during a resync filled its journal and the next resync,
/// larger by them, was refused. A client op that would take the section past
/// the peer's stage waits, parked in order, until the section ends.
#[test]
fn writes_joining_a_resync_wait_when_the_section_would_exceed_what_the_peer_stages() {
    let mut e = engine(cfg(Mode::Async, 64));
    let mut out = Vec::new();
    // 4 blocks changed while apart; the peer stages 16 blocks.
    write(&mut e, 0, 4, false, 1, &mut out);
    settle_local(&mut e, &mut out);
    assert_eq!(e.dirty().dirty_count().0, 4);
    e.set_peer_stage_bytes(16 * BS);
    out.clear();
    e.session_started(false, &mut out);
    settle_local(&mut e, &mut out);
    assert!(e.resync_progress().is_some());
    // The resync counts 4 × (4096 + 64) bytes; each 1-block write 4160 more:
    // eleven fit in 65,536, the twelfth and every request after it wait.
    for i in 0..13u64 {
        write(&mut e, 20 + i, 1, false, 10 + i as u32, &mut out);
    }
    assert_eq!(e.parked(), 2);
    let notes = out
        .iter()
        .filter(|a| matches!(a, Action::Note(Note::SectionFull { .. })))
        .count();
    assert_eq!(notes, 1, "noted once per section: {out:?}");
    settle_local(&mut e, &mut out);
    e.tick(0, &mut out);
    settle_local(&mut e, &mut out);
    let mut done: Vec<u32> = completed(&out).iter().map(|c| c.0).collect();
    done.sort();
    assert_eq!(done, (10..21).collect::<Vec<_>>(), "the eleven that joined");
    let last = *shipped_seqs(&out).last().expect("shipped");
    out.clear();
    e.peer_durable(last, &mut out);
    let through = resync_done(&out).expect("the resync is done");
    e.peer_durable(through, &mut out);
    e.peer_section_done(through, &mut out);
    assert!(e.is_in_sync(), "the section closed");
    assert_eq!(e.parked(), 0, "the waiting requests go once it ends");
    settle_local(&mut e, &mut out);
    let done: Vec<u32> = completed(&out).iter().map(|c| c.0).collect();
    assert_eq!(done, vec![21, 22]);
    e.assert_invariants();

    // A peer that stages any size: no bound.
    let mut e = engine(cfg(Mode::Async, 64));
    let mut out = Vec::new();
    write(&mut e, 0, 4, false, 1, &mut out);
    settle_local(&mut e, &mut out);
    e.session_started(false, &mut out);
    settle_local(&mut e, &mut out);
    for i in 0..13u64 {
        write(&mut e, 20 + i, 1, false, 10 + i as u32, &mut out);
    }
    assert_eq!(e.parked(), 0);
    e.assert_invariants();
}

/// Found in session 23: after a primary crash the logged active extents (960 of
/// 4 MiB by default) are compared by hash, and the `ResyncStart` announced every
/// block of them: a secondary with the default journal refused the 4 GB resync on
/// every reconnect although a few MiB differed. The blocks only suspected count a
/// 32nd of their number; blocks known to differ count whole; a dirty set of
/// suspected blocks only still announces at least 1 (0 means nothing differs).
#[test]
fn a_resync_start_counts_blocks_compared_by_hash_at_a_32nd() {
    let announced = |out: &Out| {
        out.iter()
            .find_map(|a| match a {
                Action::Ship(Outgoing::ResyncStart { blocks, .. }) => Some(blocks.0),
                _ => None,
            })
            .expect("a ResyncStart")
    };
    let mut e = engine(cfg(Mode::Sync, 1024));
    e.mark_verify(BlockIndex(0), BlockIndex(640));
    e.mark_out_of_sync(BlockIndex(700), BlockIndex(710));
    let mut out = Vec::new();
    e.session_started(false, &mut out);
    settle_local(&mut e, &mut out);
    assert_eq!(announced(&out), 10 + 640 / 32);
    assert_eq!(
        e.resync_progress().unwrap().total_blocks.0,
        650,
        "the pass covers all"
    );

    let mut e = engine(cfg(Mode::Sync, 1024));
    e.mark_verify(BlockIndex(0), BlockIndex(5));
    let mut out = Vec::new();
    e.session_started(false, &mut out);
    settle_local(&mut e, &mut out);
    assert_eq!(announced(&out), 1);
}

/// Issue 11: when even the write that would go ahead does not fit the ahead
/// budget, the full window holds writes for room instead (noted once) and the
/// stream stays a prefix.
#[test]
fn a_full_window_holds_a_write_larger_than_the_ahead_budget() {
    let (mut e, mut out) = two_write_window(16 * BS);
    write(&mut e, 0, 1, false, 1, &mut out);
    write(&mut e, 1, 1, false, 2, &mut out);
    write(&mut e, 10, 9, false, 3, &mut out);
    settle_local(&mut e, &mut out);
    assert!(!e.is_ahead());
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Note(Note::Throttling {
            peer_stage_bytes: Some(_),
            ..
        })
    )));
    assert!(
        completed(&out).len() < 3,
        "held writes wait for room: {:?}",
        completed(&out)
    );
    assert_eq!(e.dirty().dirty_count().0, 0, "nothing left the stream");
    e.assert_invariants();
}

/// Issue 9 bug 4: a demotion hands over only once the secondary holds every
/// write, not when the unacked queue is empty: while ahead, the queue drains
/// before the resync of what went into the bitmap has even started.
#[test]
fn a_demotion_does_not_hand_over_while_ahead_writes_are_only_in_the_bitmap() {
    let mut c = cfg(Mode::Async, 64);
    c.window_writes_max = 2;
    c.ahead_min_ms = 0;
    let (mut e, mut out) = connected(c);
    let s1 = write(&mut e, 0, 1, false, 1, &mut out);
    write(&mut e, 1, 1, false, 2, &mut out);
    write(&mut e, 2, 1, false, 3, &mut out);
    assert!(e.is_ahead());
    settle_local(&mut e, &mut out);
    e.peer_durable(Seq(s1.0 + 1), &mut out);
    assert_eq!(e.lag().writes, 0, "the unacked queue is empty");
    assert!(
        !e.ready_to_hand_over(),
        "block 2 is only in the bitmap: the peer lacks it"
    );
    e.tick(10, &mut out);
    assert!(e.resync_progress().is_some());
    assert!(!e.ready_to_hand_over(), "the resync runs");
    e.assert_invariants();
}

mod verify {
    use super::*;

    fn connected_verify(blocks: u64, chunk_blocks: u64) -> (E, Out) {
        let mut c = cfg(Mode::Async, blocks);
        c.resync_chunk_bytes = chunk_blocks * BS;
        connected(c)
    }

    fn verify_chunks(out: &Out) -> Vec<(Seq, ByteRange)> {
        started(out)
            .into_iter()
            .filter(|(_, k, _)| *k == OpKind::VerifyRead)
            .map(|(s, _, r)| (s, r))
            .collect()
    }

    #[test]
    fn a_verify_read_runs_after_earlier_overlapping_writes_and_before_later_ones() {
        let (mut e, mut out) = connected_verify(8, 4);
        let w1 = write(&mut e, 1, 1, false, 1, &mut out);
        assert!(started(&out).iter().any(|s| s.0 == w1));
        e.start_online_verify(false, 0)
            .expect("connected and clean");
        out.clear();
        e.tick(0, &mut out);
        // The first chunk covers blocks 0..4 and waits for w1.
        let v = e.next_seq();
        let v = Seq(v.0 - 2);
        assert!(
            !started(&out).iter().any(|s| s.0 == v),
            "the hash read waits for the earlier write: {out:?}"
        );
        out.clear();
        let w2 = write(&mut e, 2, 1, false, 2, &mut out);
        assert!(
            !started(&out).iter().any(|s| s.0 == w2),
            "later overlapping write waits"
        );
        out.clear();
        e.local_done(w1, Ok(()), &mut out);
        assert!(started(&out).iter().any(|s| s.0 == v), "{out:?}");
        out.clear();
        e.read_done(v, Ok(ReadResult::Hashes(vec![0])), &mut out);
        assert!(started(&out).iter().any(|s| s.0 == w2), "{out:?}");
        e.assert_invariants();
    }

    #[test]
    fn verify_reports_exactly_the_mismatched_blocks_as_merged_byte_ranges() {
        let (mut e, mut out) = connected_verify(10, 4);
        e.start_online_verify(false, 0).unwrap();
        out.clear();
        e.tick(0, &mut out);
        let chunks = verify_chunks(&out);
        assert_eq!(chunks.len(), 3, "4 + 4 + 2 blocks");
        assert_eq!(chunks[2].1, ByteRange::new(8 * BS, 2 * BS));
        settle_local(&mut e, &mut out);
        e.peer_hash_reply(chunks[1].0, &[0], &mut out);
        e.peer_hash_reply(chunks[0].0, &[3], &mut out);
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Scanning);
        e.peer_hash_reply(chunks[2].0, &[1], &mut out);
        assert!(!dropped(&out), "{out:?}");
        let r = e.verify_report().unwrap();
        assert_eq!(r.state, VerifyState::Done);
        assert_eq!(r.compared_blocks, BlockCount(10));
        assert_eq!(r.mismatched_blocks, BlockCount(3));
        assert_eq!(
            e.verify_mismatched_ranges(10),
            (
                vec![ByteRange::new(3 * BS, 2 * BS), ByteRange::new(9 * BS, BS)],
                false
            )
        );
        assert_eq!(
            e.dirty().dirty_count().0,
            0,
            "without repair nothing is marked"
        );
        e.assert_invariants();
    }

    #[test]
    fn repair_resyncs_the_mismatches_and_finishes_once_they_are_durable() {
        let (mut e, mut out) = connected_verify(8, 8);
        e.start_online_verify(true, 0).unwrap();
        e.tick(0, &mut out);
        let (seq, _) = verify_chunks(&out)[0];
        settle_local(&mut e, &mut out);
        out.clear();
        e.peer_hash_reply(seq, &[2, 5], &mut out);
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Repairing);
        assert!(
            out.iter().any(
                |a| matches!(a, Action::Ship(Outgoing::ResyncStart { blocks, .. }) if blocks.0 == 2)
            ),
            "{out:?}"
        );
        e.tick(1, &mut out);
        let resent: Vec<ByteRange> = started(&out)
            .into_iter()
            .filter(|(_, k, _)| *k == OpKind::ResyncRead)
            .map(|(_, _, r)| r)
            .collect();
        assert_eq!(
            resent,
            vec![ByteRange::new(2 * BS, BS), ByteRange::new(5 * BS, BS)]
        );
        settle_local(&mut e, &mut out);
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Repairing);
        let last = Seq(e.next_seq().0 - 1);
        e.peer_durable(last, &mut out);
        assert_eq!(e.verify_report().unwrap().state, VerifyState::Done);
        assert_eq!(e.dirty().dirty_count().0, 0);
    }

    #[test]
    fn verify_is_refused_unless_connected_shipping_clean_and_idle() {
        let mut e = engine(cfg(Mode::Async, 8));
        assert_eq!(
            e.start_online_verify(false, 0),
            Err(VerifyRefusal::NotConnected)
        );
        let mut out = Vec::new();
        e.session_started(true, &mut out);
        assert!(matches!(
            e.start_online_verify(false, 0),
            Err(VerifyRefusal::Resyncing { pending_blocks: 8 })
        ));
        let (mut e, _) = connected_verify(8, 4);
        e.start_online_verify(false, 0).unwrap();
        let err = e.start_online_verify(true, 0).unwrap_err();
        assert!(matches!(err, VerifyRefusal::InProgress(_)));
        assert!(
            err.to_string()
                .contains("already in progress: 0 of 8 blocks"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_session_fails_the_verify_and_marks_nothing() {
        let (mut e, mut out) = connected_verify(8, 4);
        e.start_online_verify(false, 0).unwrap();
        e.tick(0, &mut out);
        settle_local(&mut e, &mut out);
        e.session_ended(&mut out);
        let r = e.verify_report().unwrap();
        assert!(
            matches!(&r.state, VerifyState::Failed(m) if m.contains("connection to the secondary was lost")),
            "{r:?}"
        );
        assert_eq!(e.dirty().dirty_count().0, 0, "a hash check changes nothing");
        assert!(!e.wants_verify_chunk());
        e.session_started(false, &mut out);
        e.start_online_verify(false, 0).unwrap();
        e.assert_invariants();
    }
}

/// Found by e2e_crash (primary killed 2.5 s after the initial full sync): the
/// all-dirty bitmap persisted when the full sync started stayed on disk until the
/// next periodic persist, so a crash then resent the whole volume. Reaching in
/// sync persists the (now clean) bitmap at once.
/// A full sync of an 8-block async engine, every chunk durable on the peer:
/// the engine, what it did since the chunks were shipped, ResyncDone's seq.
fn full_sync_to_resync_done() -> (E, Out, Seq) {
    let mut e = engine(cfg(Mode::Async, 8));
    let mut out = Vec::new();
    e.session_started(true, &mut out);
    settle_local(&mut e, &mut out);
    e.tick(0, &mut out);
    settle_local(&mut e, &mut out);
    let last = *shipped_seqs(&out).last().expect("resync chunks shipped");
    out.clear();
    e.peer_durable(last, &mut out);
    let through = resync_done(&out).expect("resync done");
    (e, out, through)
}

#[test]
fn reaching_in_sync_persists_the_clean_bitmap_at_once() {
    let (mut e, mut out, through) = full_sync_to_resync_done();
    e.peer_durable(through, &mut out);
    e.peer_section_done(through, &mut out);
    assert!(e.is_in_sync());
    let persisted: Vec<_> = out
        .iter()
        .filter_map(|a| match a {
            Action::PersistBitmap { bitmap } => Some(bitmap.dirty_count().0),
            _ => None,
        })
        .collect();
    assert_eq!(persisted, vec![0], "one persist of a clean bitmap: {out:?}");
}

/// Sim seed 40236 async: the section closed (and the primary took its generation
/// as the peer's) on a `Durable` covering ResyncDone's seq, while the secondary's
/// section end, which shares that seq, was not durable; after a crash the two
/// sides disagreed and the next handshake was refused as a split brain. The
/// section closes on `SectionDone` now; one never asked for ends the session.
#[test]
fn a_section_closes_on_section_done_not_on_a_durable_of_the_same_seq() {
    let (mut e, mut out, through) = full_sync_to_resync_done();
    e.peer_durable(through, &mut out);
    assert!(!e.is_in_sync(), "a Durable alone leaves the section open");
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::PeerReachedGeneration)),
        "{out:?}"
    );
    out.clear();
    e.peer_section_done(Seq(through.0 + 1), &mut out);
    assert!(
        dropped(&out),
        "a SectionDone past every ResyncDone: {out:?}"
    );

    let (mut e, mut out, through) = full_sync_to_resync_done();
    out.clear();
    e.peer_durable(through, &mut out);
    e.peer_section_done(through, &mut out);
    assert!(e.is_in_sync());
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::PeerReachedGeneration)),
        "{out:?}"
    );
    // A repeat is stale, not a fault.
    out.clear();
    e.peer_section_done(through, &mut out);
    assert!(!dropped(&out), "{out:?}");
    e.assert_invariants();
}

/// The same for a session with nothing to resend: `ResyncStart { blocks: 0 }`
/// recorded at once that the peer holds this node's generation, while the
/// secondary's marker saying so might not be durable. A secondary that was a
/// sync target then lost it in a crash, and after this node wrote alone the two
/// disagreed as in sim seed 40236. It waits for the marker's `SectionDone` now.
#[test]
fn an_empty_resync_takes_the_generation_as_the_peers_only_on_section_done() {
    let (mut e, out) = connected(cfg(Mode::Async, 8));
    let reached = |out: &Out| {
        out.iter()
            .any(|a| matches!(a, Action::PeerReachedGeneration))
    };
    assert!(!reached(&out), "not before the secondary says so: {out:?}");
    assert!(e.is_in_sync(), "nothing to resend: in sync for FLUSHes");
    let mut out = Vec::new();
    e.peer_section_done(Seq(0), &mut out);
    assert!(reached(&out), "{out:?}");
    assert!(!dropped(&out), "{out:?}");
    e.assert_invariants();
}

/// ha (issue 12, `tandem set resync-rate`): the bucket was charged when a chunk's
/// read completed, so every chunk the window allowed started at once and a
/// 256 KiB/s resync sent 16 MiB in half a second (e2e_ha). Charged when started
/// now; a read that finds zeroes gets back what it does not send.
#[test]
fn a_rate_limited_resync_starts_no_more_reads_than_its_budget_allows() {
    let mut c = cfg(Mode::Async, 1024);
    c.resync_rate_bytes_per_s = 160 * 1024;
    let mut e = engine(c);
    e.mark_out_of_sync(BlockIndex(0), BlockIndex(1024));
    let mut out = Vec::new();
    e.session_started(false, &mut out);
    // The bitmap to resend is persisted before the pass opens.
    for a in std::mem::take(&mut out) {
        if let Action::PersistBitmap { .. } = a {
            e.bitmap_persisted(Ok(()), &mut out);
        }
    }
    e.tick(0, &mut out);
    e.tick(1000, &mut out);
    let reads = started(&out)
        .iter()
        .filter(|(_, k, _)| *k == OpKind::ResyncRead)
        .count();
    // One second of budget: 160 KiB, ten chunks of 16 KiB (the tenth overdraws).
    assert!(
        (1..=10).contains(&reads),
        "{reads} chunks of 16 KiB started on 160 KiB of budget"
    );
    // Zero reads send no payload: their bytes return to the bucket.
    let seqs: Vec<Seq> = started(&out)
        .iter()
        .filter(|(_, k, _)| *k == OpKind::ResyncRead)
        .map(|(s, _, _)| *s)
        .collect();
    out.clear();
    for s in seqs {
        e.read_done(s, Ok(ReadResult::Zero), &mut out);
    }
    e.tick(1001, &mut out);
    let more = started(&out)
        .iter()
        .filter(|(_, k, _)| *k == OpKind::ResyncRead)
        .count();
    assert!(more >= 1, "zero reads kept their charge: {out:?}");
    e.assert_invariants();
}

/// dr (issue 10): in async mode a client FLUSH is relayed to the secondary too (a
/// marker, nothing waits for it): there it becomes a listed consistent point of
/// the rollback window. Without it an async secondary listed no point between
/// its volume's and its newest (e2e_dr_rollback: `tandem inspect --at` fell back
/// to the end of the first full sync).
#[test]
fn an_async_flush_is_relayed_as_a_marker_and_completes_locally() {
    let (mut e, mut out) = connected(cfg(Mode::Async, 64));
    settle_local(&mut e, &mut out);
    let seq = write(&mut e, 0, 1, false, 1, &mut out);
    settle_local(&mut e, &mut out);
    out.clear();
    e.flush(2, 0, &mut out);
    settle_local(&mut e, &mut out);
    let markers: Vec<Seq> = out
        .iter()
        .filter_map(|a| match a {
            Action::Ship(Outgoing::Flush { through }) => Some(*through),
            _ => None,
        })
        .collect();
    assert_eq!(markers, vec![seq], "{out:?}");
    assert_eq!(
        completed(&out),
        vec![(2, Ok(()))],
        "async: the flush completes on the local fdatasync alone"
    );
}

/// Issue 15.6: the blocks of a crashed primary's active extents are dirty but
/// only suspected; a write while apart is known. Both count as changed, only
/// the first as suspected.
#[test]
fn suspected_blocks_are_the_active_extents_not_the_writes() {
    let mut e = engine(cfg(Mode::Async, 16));
    e.mark_verify(BlockIndex(0), BlockIndex(8));
    let mut out = Vec::new();
    write(&mut e, 12, 2, false, 1, &mut out);
    settle_local(&mut e, &mut out);
    assert_eq!(e.dirty().dirty_count().0, 10);
    assert_eq!(e.suspected_blocks().0, 8);
}
