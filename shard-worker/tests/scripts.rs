//! The shard worker's Redis side against a real Redis: lease timing and fencing, the stream reader's
//! pending-first rule (also for entries a former owner parked), and each fenced script (hand-over, commit) — what moves, what is acknowledged,
//! what is published, and that a stale owner moves nothing.

use std::time::Duration;

use im_common::connections::RedisConn;
use redis::AsyncCommands;

use im_common::idempotency::{decode_state, encode_state, Stage};
use im_common::journal::split_journaled;
use im_common::keys::Keys;
use im_common::record::MSG_FIELD;
use im_common::router::Publication;
use im_harness::env::TestEnv;
use im_shard_worker::lease::ShardLease;
use im_shard_worker::mover::{DeadLetter, Mover};
use im_shard_worker::sequences::SeqPlan;
use im_shard_worker::streams::{Fence, StreamReader, CONSUMER};

const GROUP: &str = "workers";

/// One shard's keys under a test's own prefix (removed when the shard's [`TestEnv`] is dropped).
struct Shard {
    env: TestEnv,
    conn: RedisConn,
    keys: Keys,
}

impl Shard {
    async fn new(name: &str) -> Shard {
        let env = TestEnv::new(name);
        let conn = im_common::connections::connect(&env.config().redis).await.expect("redis");
        let keys = Keys::from_config(&env.config());
        Shard { env, conn, keys }
    }

    async fn lease(&self, owner: &str, ttl: Duration) -> Option<ShardLease> {
        ShardLease::acquire(&self.conn, &self.keys, 0, owner, ttl).await.expect("acquire")
    }

    fn mover(&self, lease_value: &str) -> Mover {
        Mover {
            conn: self.conn.clone(),
            keys: self.keys.clone(),
            shard: 0,
            lease_key: self.keys.lease(0),
            lease_value: lease_value.to_owned(),
            group: GROUP.into(),
            idempotency_ttl: 60,
        }
    }

    /// A reader proving `lease_value` that barely waits.
    async fn reader(&self, stream: String, lease_value: &str) -> StreamReader {
        self.waiting_reader(stream, lease_value, 10, 0).await
    }

    /// A reader proving `lease_value` that blocks up to `block_ms` for new entries and then lets
    /// `delay_ms` pass.
    async fn waiting_reader(&self, stream: String, lease_value: &str, block_ms: u64, delay_ms: u64) -> StreamReader {
        let timeout = Duration::from_millis(2 * block_ms + 30);
        let conn =
            im_common::connections::connect_for_blocking(&self.env.config().redis, timeout).await.expect("redis");
        let fence = Fence { lease_key: self.keys.lease(0), lease_value: lease_value.to_owned() };
        let mut reader = StreamReader::new(conn, fence, stream, GROUP.into(), 100, block_ms, delay_ms);
        reader.ensure_group().await.expect("group");
        reader
    }

    /// Appends `payloads` at once (one MULTI), as a burst of messages would arrive.
    async fn append(&self, stream: &str, payloads: &[&[u8]]) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for p in payloads {
            pipe.xadd(stream, "*", &[(MSG_FIELD, *p)]).ignore();
        }
        let _: () = pipe.query_async(&mut self.conn.clone()).await.expect("xadd");
    }

    /// A seq counter of shard 0.
    async fn counter(&self, field: &str) -> Option<u64> {
        self.conn.clone().hget(self.keys.seq_counters(0), field).await.expect("hget")
    }

    /// The count of messages in `to_save`'s entries.
    async fn handed_messages(&self) -> Option<u64> {
        self.conn.clone().get(self.keys.to_save_messages(0)).await.expect("get")
    }

    /// The count as stored, whatever it holds.
    async fn handed_messages_raw(&self) -> Option<String> {
        self.conn.clone().get(self.keys.to_save_messages(0)).await.expect("get")
    }

    async fn len(&self, stream: &str) -> usize {
        self.conn.clone().xlen(stream).await.expect("xlen")
    }

    async fn pending(&self, stream: &str) -> usize {
        let reply: redis::streams::StreamPendingReply =
            self.conn.clone().xpending(stream, GROUP).await.expect("xpending");
        reply.count()
    }
}

#[tokio::test]
async fn a_held_lease_is_not_given_twice_and_every_new_owner_gets_a_larger_token() {
    let s = Shard::new("lease_tokens").await;
    let first = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    assert!(first.is_valid());
    assert!(s.lease("b", Duration::from_secs(5)).await.is_none(), "held lease given to a second owner");
    first.release().await;
    let second = s.lease("b", Duration::from_secs(5)).await.expect("released shard");
    assert!(second.token > first.token, "tokens {} then {}", first.token, second.token);
    assert_eq!(second.value, format!("{}:b", second.token));
}

#[tokio::test]
async fn an_owner_stops_acting_before_its_lease_can_expire_in_redis() {
    let s = Shard::new("lease_timing").await;
    // Long enough that the renewal at 0.85 TTL reaches Redis before the key expires on a loaded
    // 2-core CI machine (with 500 ms the margin was 75 ms, and CI missed it once).
    let ttl = Duration::from_millis(2000);
    let lease = s.lease("a", ttl).await.expect("free shard");
    // Valid for TTL minus a fifth without renewal, never up to the TTL itself.
    tokio::time::sleep(ttl * 3 / 5).await;
    assert!(lease.is_valid(), "gave up early");
    tokio::time::sleep(ttl / 4).await;
    assert!(!lease.is_valid(), "still acting at 0.85 TTL without renewal");
    // A renewal that Redis confirms makes it valid again.
    assert!(lease.renew().await);
    assert!(lease.is_valid());
}

#[tokio::test]
async fn a_lease_taken_over_cannot_be_renewed_by_its_former_owner() {
    let s = Shard::new("lease_takeover").await;
    let old = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let _: () = s.conn.clone().del(s.keys.lease(0)).await.expect("del");
    let new = s.lease("b", Duration::from_secs(5)).await.expect("expired shard");
    assert!(!old.renew().await, "former owner renewed a lease it lost");
    assert!(!old.is_valid());
    assert!(new.renew().await);
}

#[tokio::test]
async fn a_reader_returns_pending_entries_before_new_ones() {
    let s = Shard::new("reader_pending").await;
    let stream = s.keys.accepted_stream(0);
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let mut first = s.reader(stream.clone(), &lease.value).await;
    s.append(&stream, &[b"m1", b"m2"]).await;
    let batch = first.next_batch().await.expect("read");
    assert_eq!(batch.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(), [b"m1", b"m2"]);
    // Nothing acknowledged; a new owner (same consumer name) must see them again, before m3.
    s.append(&stream, &[b"m3"]).await;
    let mut next_owner = s.reader(stream.clone(), &lease.value).await;
    let batch = next_owner.next_batch().await.expect("read");
    assert_eq!(batch.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(), [b"m1", b"m2", b"m3"]);
}

#[tokio::test]
async fn handoff_moves_a_batch_to_to_save_as_one_entry_counts_it_publishes_it_and_acknowledges_it_in_one_step() {
    let s = Shard::new("handoff").await;
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let (accepted, to_save) = (s.keys.accepted_stream(0), s.keys.to_save_stream(0));
    let mut reader = s.reader(accepted.clone(), &lease.value).await;
    s.append(&accepted, &[b"m1", b"m2"]).await;
    let batch = reader.next_batch().await.expect("read");
    let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
    let handed = b"m1 and m2, numbered";
    let publication = Publication { node: 7, payload: b"pushes".to_vec() };
    let seqs = SeqPlan { fields: vec!["5:6".into()], bases: vec![0], tops: vec![2] };

    let client = redis::Client::open(s.env.redis_url.as_str()).expect("url");
    let mut sub = client.get_async_pubsub().await.expect("pubsub");
    sub.subscribe(s.keys.shard_channel(0, 7)).await.expect("subscribe");

    let mover = s.mover(&lease.value);
    mover.handoff(&accepted, &to_save, &ids, handed, std::slice::from_ref(&publication), &seqs).await.expect("handoff");
    assert_eq!((s.len(&accepted).await, s.pending(&accepted).await), (0, 0), "accepted not trimmed");
    let entries: redis::streams::StreamRangeReply = s.conn.clone().xrange_all(&to_save).await.expect("xrange");
    assert_eq!(entries.ids.len(), 1, "one entry per batch");
    assert_eq!(entries.ids[0].get::<Vec<u8>>(MSG_FIELD).as_deref(), Some(handed.as_slice()));
    assert_eq!(s.handed_messages().await, Some(2), "the batch's messages were not counted");
    assert_eq!(s.counter("5:6").await, Some(2), "the batch's seqs were not taken");
    // A retry of a batch whose reply got lost does nothing twice (and is not refused as stale).
    mover.handoff(&accepted, &to_save, &ids, handed, &[publication], &seqs).await.expect("retry");
    assert_eq!(
        (s.len(&to_save).await, s.handed_messages().await, s.counter("5:6").await),
        (1, Some(2), Some(2)),
        "the retry handed the batch on again"
    );
    let msg = tokio::time::timeout(Duration::from_secs(2), futures_util::StreamExt::next(&mut sub.on_message()))
        .await
        .expect("published")
        .expect("message");
    let payload = msg.get_payload_bytes().to_vec();
    let (journal, _, body) = split_journaled(&payload).expect("journaled");
    assert_eq!(journal, s.keys.journal_of_shard(0, 7));
    assert_eq!(body, b"pushes");
    assert_eq!(s.len(journal).await, 1, "publication not journaled");
}

/// A pending entry can outlive its stream entry (deleted by hand, say): a read returns it with no
/// fields, as an empty payload. A batch is taken for one handed on already (a retry after a lost
/// reply) only when none of its entries is left in the stream, not because its first one is gone:
/// otherwise the rest would stay unacknowledged and the next batch's trim would drop them unsaved.
#[tokio::test]
async fn a_batch_whose_first_entry_is_gone_from_the_stream_is_still_handed_on() {
    let s = Shard::new("handoff_gone").await;
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let (accepted, to_save) = (s.keys.accepted_stream(0), s.keys.to_save_stream(0));
    let mut reader = s.reader(accepted.clone(), &lease.value).await;
    s.append(&accepted, &[b"m1", b"m2", b"m3"]).await;
    let batch = reader.next_batch().await.expect("read");
    let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
    let _: usize = s.conn.clone().xdel(&accepted, &[ids[0]]).await.expect("xdel");

    s.mover(&lease.value)
        .handoff(&accepted, &to_save, &ids, b"batch", &[], &SeqPlan::default())
        .await
        .expect("handoff");
    assert_eq!((s.len(&accepted).await, s.pending(&accepted).await), (0, 0), "the batch was not acknowledged");
    assert_eq!((s.len(&to_save).await, s.handed_messages().await), (1, Some(3)), "the batch was not handed on");
}

/// SPEC §3.10: a batch numbered from counters that moved since (the baseline path raised a floor)
/// is refused whole — nothing pushed, handed on or acknowledged — and renumbered by the stage.
#[tokio::test]
async fn a_batch_numbered_from_stale_counters_is_refused_and_moves_nothing() {
    let s = Shard::new("seqstale").await;
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let (accepted, to_save) = (s.keys.accepted_stream(0), s.keys.to_save_stream(0));
    let mut reader = s.reader(accepted.clone(), &lease.value).await;
    s.append(&accepted, &[b"m1"]).await;
    let batch = reader.next_batch().await.expect("read");
    redis::cmd("HSET")
        .arg(s.keys.seq_counters(0))
        .arg("5:6")
        .arg(3)
        .query_async::<()>(&mut s.conn.clone())
        .await
        .expect("hset");
    let stale = SeqPlan { fields: vec!["5:6".into()], bases: vec![2], tops: vec![3] };
    let err = s
        .mover(&lease.value)
        .handoff(&accepted, &to_save, &[batch[0].id.as_str()], &batch[0].payload, &[], &stale)
        .await
        .expect_err("a batch numbered from stale counters went through");
    assert!(err.to_string().contains("SEQSTALE"), "{err}");
    assert_eq!((s.len(&accepted).await, s.pending(&accepted).await, s.len(&to_save).await), (1, 1, 0));
    assert_eq!(s.counter("5:6").await, Some(3));
}

/// SPEC §3.10: raising the counters (fail-open floors, restores, the save stage's commit) moves each
/// up to the highest top given for it, in whatever order and however often a field comes, and never
/// down.
#[tokio::test]
async fn raising_the_counters_takes_each_fields_highest_top_and_never_lowers_one() {
    let s = Shard::new("seqraise").await;
    redis::cmd("HSET")
        .arg(s.keys.seq_counters(0))
        .arg(&["5:6", "4", "7:8", "9"])
        .query_async::<()>(&mut s.conn.clone())
        .await
        .expect("hset");
    let floors = [(5, 6, 3), (5, 6, 6), (7, 8, 2), (5, 6, 5), (1, 2, 1)];
    im_shard_worker::sequences::raise(&s.conn, &s.keys, 0, &floors).await.expect("raise");
    assert_eq!(
        (s.counter("5:6").await, s.counter("7:8").await, s.counter("1:2").await),
        (Some(6), Some(9), Some(1)),
        "5:6 to its highest top, 7:8 kept, 1:2 created"
    );
    // More fields than one HMGET takes.
    let many: Vec<(u64, u64, u64)> = (0..1200).map(|k| (100 + k, 1, k + 1)).collect();
    im_shard_worker::sequences::raise(&s.conn, &s.keys, 0, &many).await.expect("raise");
    assert_eq!((s.counter("100:1").await, s.counter("1299:1").await), (Some(1), Some(1200)));
}

#[tokio::test]
async fn a_fenced_out_owner_moves_nothing() {
    let s = Shard::new("fenced").await;
    let (accepted, to_save) = (s.keys.accepted_stream(0), s.keys.to_save_stream(0));
    let current = s.lease("b", Duration::from_secs(5)).await.expect("free shard");
    let mut reader = s.reader(accepted.clone(), &current.value).await;
    s.append(&accepted, &[b"m1"]).await;
    let batch = reader.next_batch().await.expect("read");
    let stale = s.mover("1:a");
    let err = stale
        .handoff(&accepted, &to_save, &[batch[0].id.as_str()], &batch[0].payload, &[], &SeqPlan::default())
        .await
        .expect_err("a stale owner's handoff went through");
    assert!(err.to_string().contains("FENCED"), "{err}");
    assert_eq!((s.len(&accepted).await, s.pending(&accepted).await, s.len(&to_save).await), (1, 1, 0));
}

#[tokio::test]
async fn commit_marks_saved_dead_letters_the_rejected_and_acknowledges_the_batch() {
    let s = Shard::new("commit").await;
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let (to_save, dead) = (s.keys.to_save_stream(0), s.keys.dead_letter_stream(0));
    let mut reader = s.reader(to_save.clone(), &lease.value).await;
    s.append(&to_save, &[b"good", b"bad"]).await;
    let batch = reader.next_batch().await.expect("read");
    let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
    let key = s.keys.idempotency(0, 1001, "c-1");
    let saved = [(key.clone(), encode_state(Stage::Saved, 42))];
    let rejected = [DeadLetter { payload: b"bad", reason: "check constraint" }];

    // The rows were saved with seqs up to 9; the counter (at 4) is raised, another (at 12) is not lowered.
    redis::cmd("HSET")
        .arg(s.keys.seq_counters(0))
        .arg("1:2")
        .arg(4)
        .arg("3:4")
        .arg(12)
        .query_async::<()>(&mut s.conn.clone())
        .await
        .expect("hset");
    let seqs = SeqPlan { fields: vec!["1:2".into(), "3:4".into()], bases: vec![0, 0], tops: vec![9, 7] };
    s.mover(&lease.value).commit(&to_save, &dead, &ids, 0, &rejected, &[], &saved, &seqs).await.expect("commit");
    assert_eq!((s.counter("1:2").await, s.counter("3:4").await), (Some(9), Some(12)));
    assert_eq!((s.len(&to_save).await, s.pending(&to_save).await), (0, 0), "to_save not trimmed");
    let state: String = s.conn.clone().get(&key).await.expect("state");
    assert_eq!(decode_state(&state), Some((Stage::Saved, 42)));
    let ttl: i64 = s.conn.clone().ttl(&key).await.expect("ttl");
    assert!(ttl > 0 && ttl <= 60, "idempotency key without its window: ttl {ttl}");
    let dead_entries: redis::streams::StreamRangeReply = s.conn.clone().xrange_all(&dead).await.expect("xrange");
    assert_eq!(dead_entries.ids.len(), 1);
    let reason: String = dead_entries.ids[0].get("reason").expect("reason");
    assert_eq!(reason, "check constraint");
}

/// The backlog counts `to_save` in messages: a commit takes its entries' messages off the count,
/// and the commit that empties the stream removes the count, so one set wrong (by hand, say) does
/// not outlive the next drain.
#[tokio::test]
async fn committed_batches_leave_the_to_save_count_and_an_emptied_stream_resets_it() {
    let s = Shard::new("count").await;
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let (to_save, dead) = (s.keys.to_save_stream(0), s.keys.dead_letter_stream(0));
    s.append(&to_save, &[b"3 messages", b"4 messages"]).await;
    let _: () = s.conn.clone().set(s.keys.to_save_messages(0), 7).await.expect("set");
    let conn = im_common::connections::connect(&s.env.config().redis).await.expect("redis");
    let fence = Fence { lease_key: s.keys.lease(0), lease_value: lease.value.clone() };
    let mut reader = StreamReader::new(conn, fence, to_save.clone(), GROUP.into(), 1, 10, 0);
    reader.ensure_group().await.expect("group");
    let mover = s.mover(&lease.value);
    let plan = SeqPlan::default();

    let first = reader.next_batch().await.expect("read");
    mover.commit(&to_save, &dead, &[first[0].id.as_str()], 3, &[], &[], &[], &plan).await.expect("commit");
    assert_eq!(s.handed_messages().await, Some(4));

    let _: () = s.conn.clone().set(s.keys.to_save_messages(0), 99).await.expect("set");
    let second = reader.next_batch().await.expect("read");
    mover.commit(&to_save, &dead, &[second[0].id.as_str()], 4, &[], &[], &[], &plan).await.expect("commit");
    assert_eq!((s.len(&to_save).await, s.handed_messages().await), (0, None), "the emptied stream kept a count");
}

/// The count only informs: one that is not a number (set by hand, say) neither stops a hand-over
/// nor a commit, and the commit that empties `to_save` removes it.
#[tokio::test]
async fn a_to_save_count_that_is_not_a_number_stops_nothing_and_is_reset_by_the_next_drain() {
    let s = Shard::new("count_garbage").await;
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let (accepted, to_save, dead) = (s.keys.accepted_stream(0), s.keys.to_save_stream(0), s.keys.dead_letter_stream(0));
    let _: () = s.conn.clone().set(s.keys.to_save_messages(0), "not a number").await.expect("set");
    let mut reader = s.reader(accepted.clone(), &lease.value).await;
    s.append(&accepted, &[b"m1", b"m2"]).await;
    let batch = reader.next_batch().await.expect("read");
    let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
    let mover = s.mover(&lease.value);
    mover.handoff(&accepted, &to_save, &ids, b"batch", &[], &SeqPlan::default()).await.expect("handoff");
    assert_eq!((s.len(&accepted).await, s.len(&to_save).await), (0, 1), "the batch did not move");

    let mut saver = s.reader(to_save.clone(), &lease.value).await;
    let handed = saver.next_batch().await.expect("read");
    let handed_ids: Vec<&str> = handed.iter().map(|e| e.id.as_str()).collect();
    mover.commit(&to_save, &dead, &handed_ids, 2, &[], &[], &[], &SeqPlan::default()).await.expect("commit");
    assert_eq!((s.len(&to_save).await, s.handed_messages_raw().await), (0, None));
}

/// An acknowledged batch leaves its stream and nothing after it does: the scripts trim up to the
/// batch's last id (`XTRIM MINID` just past it). The entry right after — here the very next id,
/// `5-3` after `5-2` — stays, unacknowledged, and is the reader's next batch.
#[tokio::test]
async fn acknowledging_a_batch_trims_exactly_its_entries_off_the_stream() {
    let s = Shard::new("trim").await;
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let (to_save, dead) = (s.keys.to_save_stream(0), s.keys.dead_letter_stream(0));
    for (id, payload) in [("5-1", "m1"), ("5-2", "m2"), ("5-3", "m3")] {
        let _: String = s.conn.clone().xadd(&to_save, id, &[(MSG_FIELD, payload)]).await.expect("xadd");
    }
    let conn = im_common::connections::connect(&s.env.config().redis).await.expect("redis");
    let fence = Fence { lease_key: s.keys.lease(0), lease_value: lease.value.clone() };
    let mut reader = StreamReader::new(conn, fence, to_save.clone(), GROUP.into(), 2, 10, 0);
    reader.ensure_group().await.expect("group");
    let batch = reader.next_batch().await.expect("read");
    let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["5-1", "5-2"]);

    s.mover(&lease.value).commit(&to_save, &dead, &ids, 0, &[], &[], &[], &SeqPlan::default()).await.expect("commit");
    let left: redis::streams::StreamRangeReply = s.conn.clone().xrange_all(&to_save).await.expect("xrange");
    assert_eq!(left.ids.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["5-3"], "the batch, and only it, left");
    assert_eq!(s.pending(&to_save).await, 0);
    let next = reader.next_batch().await.expect("read");
    assert_eq!(next.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(), [b"m3"]);
}

/// A group read by a former owner that has not noticed its lease is gone (its key evicted or lost
/// in a failover) moves entries into the pending list the owner shares with it (one consumer name
/// per shard). The former owner's read is refused, and the owner, which read that list once when it
/// took over, must still take them — in stream order, before what comes after them — or they stay
/// unsaved while later messages of the same senders go past (SPEC §3.1, §3.4, §3.10).
#[tokio::test]
async fn entries_a_former_owner_parks_in_the_pending_list_are_read_by_the_owner_in_order() {
    let s = Shard::new("parked").await;
    let stream = s.keys.accepted_stream(0);
    let old = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let mut former = s.reader(stream.clone(), &old.value).await;
    let _: () = s.conn.clone().del(s.keys.lease(0)).await.expect("del");
    let new = s.lease("b", Duration::from_secs(5)).await.expect("free shard");
    let mut owner = s.reader(stream.clone(), &new.value).await;
    assert!(owner.next_batch().await.expect("read").is_empty());
    s.append(&stream, &[b"m1", b"m2", b"m3", b"m4"]).await;

    // A group read under the shard's consumer name that took m1 and m2 (a former owner's, of any
    // build), then the former owner's own read, which is refused whatever it moved.
    let parked: redis::streams::StreamReadReply = s
        .conn
        .clone()
        .xread_options(
            &[&stream],
            &[">"],
            &redis::streams::StreamReadOptions::default().group(GROUP, CONSUMER).count(2),
        )
        .await
        .expect("xreadgroup");
    assert_eq!(parked.keys[0].ids.len(), 2);
    let err = former.next_batch().await.expect_err("a former owner read from the group");
    assert!(err.to_string().contains("FENCED"), "{err}");

    let mut read = Vec::new();
    loop {
        let batch = owner.next_batch().await.expect("read");
        if batch.is_empty() {
            break;
        }
        read.extend(batch.into_iter().map(|e| e.payload));
    }
    let expected: Vec<Vec<u8>> = ["m1", "m2", "m3", "m4"].iter().map(|m| m.as_bytes().to_vec()).collect();
    assert_eq!(read, expected, "parked entries lost or out of order");
}

/// After a failed read the stage reads on from the last batch it took, and never gets that batch
/// again: the save stage may still be committing it (its commit runs beside the next read), and a
/// batch that held it again with new entries behind it would be taken for a retry of an
/// already-handed batch, so the new entries would be saved without receipts and trimmed off while
/// still pending.
#[tokio::test]
async fn a_read_after_a_failed_one_goes_on_from_the_last_batch_and_never_repeats_it() {
    let s = Shard::new("reread").await;
    let stream = s.keys.accepted_stream(0);
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let mut reader = s.reader(stream.clone(), &lease.value).await;
    s.append(&stream, &[b"m1", b"m2"]).await;
    let in_flight = reader.next_batch().await.expect("read");
    assert_eq!(in_flight.len(), 2);
    // The next read failed (a Redis blip) while the batch is still being committed.
    reader.resume();
    s.append(&stream, &[b"m3"]).await;
    let batch = reader.next_batch().await.expect("read");
    assert_eq!(batch.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(), [b"m3"], "a batch in flight read again");
}

#[tokio::test]
async fn a_waiting_reader_wakes_for_a_new_entry_and_takes_the_whole_burst() {
    let s = Shard::new("read_wait").await;
    let stream = s.keys.accepted_stream(0);
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let mut reader = s.waiting_reader(stream.clone(), &lease.value, 2000, 50).await;
    let started = std::time::Instant::now();
    let read = tokio::spawn(async move { reader.next_batch().await.map(|b| b.len()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.append(&stream, &[b"m1", b"m2", b"m3"]).await;
    let n = read.await.unwrap().expect("read");
    assert_eq!(n, 3, "the burst was split");
    assert!(started.elapsed() < Duration::from_millis(1500), "woke only at the block timeout");
}

/// The batch delay lets a burst gather once the stream was drained; it is not added on top of the
/// time the stage spent on its previous batch, during which the next entries were already arriving
/// (under load the save stage waited its 30 ms after every INSERT, during which the next batch had
/// long gathered; counting the busy time cut the saved p50 by a third at 5,000 msg/s, BENCHMARKS).
#[tokio::test]
async fn a_stage_busy_for_longer_than_the_batch_delay_reads_its_next_batch_without_waiting_again() {
    let s = Shard::new("read_busy").await;
    let stream = s.keys.accepted_stream(0);
    let lease = s.lease("a", Duration::from_secs(5)).await.expect("free shard");
    let delay = Duration::from_millis(1500);
    let mut reader = s.waiting_reader(stream.clone(), &lease.value, 3000, delay.as_millis() as u64).await;
    s.append(&stream, &[b"m1"]).await;
    assert_eq!(reader.next_batch().await.expect("read").len(), 1);

    // The stage works on m1 for longer than the delay; m2 arrives meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.append(&stream, &[b"m2"]).await;
    tokio::time::sleep(delay).await;

    let started = std::time::Instant::now();
    let batch = reader.next_batch().await.expect("read");
    assert_eq!(batch.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(), [b"m2"]);
    assert!(
        started.elapsed() < delay / 2,
        "the next batch waited {:?} more after the stage had been busy for longer than the delay",
        started.elapsed()
    );
}
