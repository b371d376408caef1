//! The SQL layer against a real MariaDB/MySQL: migrations, batched saves, duplicates, rejections.

use im_common::record::ChatMessage;
use im_common::store::{migrate, Position, Receipt, Store};
use im_harness::env::TestEnv;

fn msg(id: u64, from: u64, to: u64, cmid: &str, body: &str) -> ChatMessage {
    // seq 0: numbered by the save, as on the baseline path.
    ChatMessage { id, from, to, client_msg_id: cmid.into(), msg_type: "TEXT".into(), body: body.into(), seq: 0 }
}

#[tokio::test]
async fn migrations_apply_once_and_record_their_versions() {
    let env = TestEnv::new("migrate");
    assert_eq!(migrate(&env.mysql_url).await.unwrap(), vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(migrate(&env.mysql_url).await.unwrap(), Vec::<u32>::new(), "second run applies nothing");
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM schema_migrations").await.unwrap(), 7);
    store.close().await;
    env.cleanup().await;
}

/// A database at version 1 (PAD SPACE clientMsgIds, rows in it) upgrades in place: rows keep their
/// bytes, and from then on "x" and "x " are two keys. Migration 2 may run again (a runner that died
/// after the ALTER but before recording it) without harm.
#[tokio::test]
async fn upgrading_a_version_1_database_keeps_its_rows_and_compares_client_msg_ids_byte_for_byte() {
    let env = TestEnv::new("upgrade");
    let store = store_with_padded_client_msg_ids(&env).await;
    store.execute("DELETE FROM schema_migrations WHERE version = 2").await.unwrap();
    store.save_batch(&[msg(70, 1, 2, "x", "old"), msg(71, 1, 2, "é✓", "old too")]).await.unwrap();

    assert_eq!(migrate(&env.mysql_url).await.unwrap(), vec![2]);
    store.execute("DELETE FROM schema_migrations WHERE version = 2").await.unwrap();
    assert_eq!(migrate(&env.mysql_url).await.unwrap(), vec![2], "re-running migration 2 is harmless");

    let out = store.save_batch(&[msg(72, 1, 2, "x ", "new"), msg(73, 1, 2, "é✓", "retry")]).await.unwrap();
    assert_eq!((out.saved, out.rejected), (vec![(0, 72, 3), (1, 71, 2)], vec![]), "a retry spends no seq");
    let rows: Vec<(u64, String)> = store.all_ids().await.unwrap().into_iter().map(|(_, id, c)| (id, c)).collect();
    assert_eq!(rows, vec![(70, "x".into()), (71, "é✓".into()), (72, "x ".into())]);
    store.close().await;
    env.cleanup().await;
}

/// SPEC §3.10, one seq per message: a message that took both paths in a fail-open episode (its
/// append reached Redis after all, and the gateway saved it on the baseline path too) is numbered
/// by whichever path claims it first; the other follows: the stream copy takes the row's seq, or
/// the fail-open save leaves the message to the stream.
#[tokio::test]
async fn a_message_on_both_paths_gets_one_seq_whichever_path_claims_it_first() {
    let env = TestEnv::new("claims");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 2).unwrap();

    // The baseline path first: saved with seq 1; the stream's claim finds the row's seq.
    let saved = store.save_fail_open(&[msg(20, 1, 2, "a", "fell open")]).await.unwrap();
    assert_eq!((saved.saved, saved.streamed), (vec![(0, 20, 1)], vec![]));
    let seqs = store.claim_for_stream(&[21, 20]).await.unwrap();
    assert_eq!(seqs, [(20, 1)].into_iter().collect(), "20 follows its row; 21 is the stream's to number");
    assert_eq!(store.claim_for_stream(&[20, 21]).await.unwrap(), seqs, "a retried batch finds its own claims");

    // The stream first (21): the fail-open save leaves it out and saves the rest of its batch.
    let out =
        store.save_fail_open(&[msg(21, 1, 2, "b", "in the stream"), msg(22, 1, 2, "c", "fell open")]).await.unwrap();
    assert_eq!((out.saved, out.rejected, out.streamed), (vec![(1, 22, 2)], vec![], vec![0]));
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages WHERE id = 21").await.unwrap(), 0, "no row for 21");

    // Without claims (the baseline mode's save, the shard owner's save) nothing is claimed.
    let plain = store.save_batch(&[msg(23, 1, 2, "d", "baseline mode")]).await.unwrap();
    assert_eq!((plain.saved, plain.streamed), (vec![(0, 23, 3)], vec![]));
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM path_claims").await.unwrap(), 3, "20, 21 and 22 only");

    // The fail-open saves (20 and 22) wait for the shard owner to raise its counters to their seqs,
    // each until it is marked raised; the stream's claim (21) never does.
    let mut unraised = store.unraised_fail_open_saves().await.unwrap();
    unraised.sort_unstable();
    assert_eq!(unraised, [(20, 1, 2, 1), (22, 1, 2, 2)], "(claim, from, to, seq)");
    store.mark_raised(&[22]).await.unwrap();
    assert_eq!(store.unraised_fail_open_saves().await.unwrap(), [(20, 1, 2, 1)]);

    // Pruning deletes the claims of older messages only.
    assert_eq!(store.prune_path_claims(22).await.unwrap(), 2);
    assert_eq!(store.query_u64("SELECT MIN(id) FROM path_claims").await.unwrap(), 22, "22 is kept");
    store.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_with_duplicates_and_a_poison_row_saves_the_rest() {
    let env = TestEnv::new("save");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    // A permanent, row-level rejection: the database refuses this body forever.
    store.execute("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (content <> 'POISON')").await.unwrap();

    let first = store.save_batch(&[msg(10, 1, 2, "a", "hello")]).await.unwrap();
    assert_eq!(first.saved, vec![(0, 10, 1)]);

    let batch = [
        msg(11, 1, 2, "b", "one"),
        msg(12, 1, 2, "a", "retry of a with a new id"), // same sender + clientMsgId as id 10
        msg(13, 3, 2, "c", "POISON"),
        msg(14, 3, 1, "d", "three"),
        msg(11, 1, 2, "b", "one"), // the same message twice in one batch
    ];
    let out = store.save_batch(&batch).await.unwrap();
    assert_eq!(
        out.saved,
        vec![(0, 11, 2), (1, 10, 1), (3, 14, 1), (4, 11, 2)],
        "duplicates report the stored id and seq; rejected rows and retries spend no seq"
    );
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].0, 2);
    assert!(out.rejected[0].1.contains("no_poison") || out.rejected[0].1.to_lowercase().contains("check"));

    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 3);
    let history = store.history(2, 1, u64::MAX, 10).await.unwrap();
    assert_eq!(history.iter().map(|m| m.id).collect::<Vec<_>>(), vec![11, 10], "newest first, both directions");
    assert_eq!(store.history(1, 2, 11, 10).await.unwrap().len(), 1, "before is exclusive");
    // Chat list: user 2 talked with 1 and 3? Only 1 (3's message was rejected).
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM conversations WHERE owner_id = 2").await.unwrap(), 1);
    assert_eq!(
        store.query_u64("SELECT last_msg_id FROM conversations WHERE owner_id = 1 AND peer_id = 2").await.unwrap(),
        11
    );
    store.close().await;
    env.cleanup().await;
}

/// SPEC §3.10–3.11: seqs per direction, sync pages after a position, positions that never move
/// back, and the conversation list built from them.
#[tokio::test]
async fn sync_pages_follow_per_conversation_positions() {
    let env = TestEnv::new("syncq");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    let saved = store
        .save_batch(&[
            msg(20, 1, 5, "x", "1"),
            msg(21, 2, 5, "y", "2"),
            msg(22, 1, 6, "z", "3"),
            msg(23, 1, 5, "w", "4"),
        ])
        .await
        .unwrap()
        .saved;
    assert_eq!(saved, vec![(0, 20, 1), (1, 21, 1), (2, 22, 1), (3, 23, 2)], "one sequence per direction");
    let mut behind = store.behind(5).await.unwrap();
    behind.sort_unstable();
    assert_eq!(behind, vec![(1, 0), (2, 0)]);
    let page: Vec<(u64, u64)> =
        store.messages_after(1, 5, 0, 10).await.unwrap().iter().map(|m| (m.id, m.seq)).collect();
    assert_eq!(page, vec![(20, 1), (23, 2)]);

    let at = |delivered, read| Position { delivered, read };
    store.advance_positions(&[((5, 1), at(1, 0)), ((6, 1), at(0, 1))]).await.unwrap();
    store.advance_positions(&[((5, 1), at(0, 0))]).await.unwrap(); // never moves back
    let mut behind = store.behind(5).await.unwrap();
    behind.sort_unstable();
    assert_eq!(behind, vec![(1, 1), (2, 0)]);
    assert!(store.behind(6).await.unwrap().is_empty(), "read moves delivered too");
    let page: Vec<u64> = store.messages_after(1, 5, 1, 10).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(page, vec![23]);

    let seqs = store.seqs_of(&[(5, 23), (6, 23)]).await.unwrap();
    assert_eq!(seqs.into_iter().collect::<Vec<_>>(), vec![((5, 23), (1, 2))], "only the recipient's own message");
    let receipts = store.receipts_of(&[(5, 1), (6, 1), (7, 1)]).await.unwrap();
    let receipt = |delivered, read, delivered_id, read_id| Receipt { at: at(delivered, read), delivered_id, read_id };
    assert_eq!(receipts.get(&(5, 1)), Some(&receipt(1, 0, Some(20), None)), "the id at the delivered seq");
    assert_eq!(receipts.get(&(6, 1)), Some(&receipt(1, 1, Some(22), Some(22))), "read moves delivered too");
    assert_eq!(receipts.len(), 2, "pairs without a position are left out");

    let list = store.conversations(5, u64::MAX, 10).await.unwrap();
    let summary: Vec<(u64, Option<u64>, u64, u64)> =
        list.iter().map(|c| (c.peer, c.last.as_ref().map(|m| m.id), c.last_in_seq, c.delivered)).collect();
    assert_eq!(summary, vec![(1, Some(23), 2, 1), (2, Some(21), 1, 0)], "newest activity first");
    let of_1 = store.conversations(1, u64::MAX, 10).await.unwrap();
    let to_5 = of_1.iter().find(|c| c.peer == 5).unwrap();
    assert_eq!((to_5.last_out_seq, to_5.peer_delivered, to_5.peer_read), (2, 1, 0));
    assert_eq!(store.conversations(5, 23, 10).await.unwrap().len(), 1, "before pages by the last message");
    store.close().await;
    env.cleanup().await;
}

/// SPEC §3.9: clientMsgIds are compared byte for byte. A collation that pads ("x" = "x ") would fold
/// two messages into one UNIQUE key: the second would be acknowledged as saved without a row.
#[tokio::test]
async fn client_msg_ids_differing_only_in_trailing_spaces_are_two_messages_with_two_rows() {
    let env = TestEnv::new("pad");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    // Apart, in two batches, and together in one.
    assert_eq!(store.save_batch(&[msg(30, 1, 2, "x", "first")]).await.unwrap().saved, vec![(0, 30, 1)]);
    let out = store.save_batch(&[msg(31, 1, 2, "x ", "second")]).await.unwrap();
    assert_eq!((out.saved, out.rejected), (vec![(0, 31, 2)], vec![]), "\"x \" is not a retry of \"x\"");
    let out = store.save_batch(&[msg(32, 1, 2, "y", "third"), msg(33, 1, 2, "y  ", "fourth")]).await.unwrap();
    assert_eq!((out.saved, out.rejected), (vec![(0, 32, 3), (1, 33, 4)], vec![]));

    let rows = store.all_ids().await.unwrap();
    let cmids: Vec<(u64, &str)> = rows.iter().map(|(_, id, c)| (*id, c.as_str())).collect();
    assert_eq!(cmids, vec![(30, "x"), (31, "x "), (32, "y"), (33, "y  ")], "every message has its own row, bytes kept");
    let history: Vec<(u64, String)> =
        store.history(2, 1, u64::MAX, 10).await.unwrap().into_iter().map(|m| (m.id, m.client_msg_id)).collect();
    assert_eq!(history[..2], [(33, "y  ".to_owned()), (32, "y".to_owned())]);
    // A real retry (same bytes) still reports the stored id.
    let retry = store.save_batch(&[msg(34, 1, 2, "x ", "second")]).await.unwrap();
    assert_eq!(retry.saved, vec![(0, 31, 2)]);
    store.close().await;
    env.cleanup().await;
}

/// SPEC §3.8/§3.9: a message whose serverMsgId is already stored for ANOTHER message has no row of its
/// own; reporting it saved would be a silent loss. It is rejected (dead letter, `save_failed`).
#[tokio::test]
async fn a_new_message_reusing_a_stored_id_is_rejected_not_saved() {
    let env = TestEnv::new("pkcoll");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    store.save_batch(&[msg(40, 1, 2, "a", "stored first")]).await.unwrap();

    let batch = [
        msg(41, 1, 2, "b", "fine"),
        msg(40, 3, 4, "c", "another sender, same id"),
        msg(40, 1, 2, "d", "same sender, same id, other clientMsgId"),
        msg(40, 1, 2, "a", "the stored message itself: a duplicate"),
    ];
    let out = store.save_batch(&batch).await.unwrap();
    assert_eq!(out.saved, vec![(0, 41, 2), (3, 40, 1)]);
    let rejected: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(rejected, vec![1, 2], "{:?}", out.rejected);
    for (_, reason) in &out.rejected {
        assert!(reason.contains("40") && reason.contains("another message"), "unclear reason: {reason}");
    }
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 2);
    // The rejected messages touched no chat list.
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM conversations WHERE owner_id IN (3, 4)").await.unwrap(), 0);
    store.close().await;
    env.cleanup().await;
}

/// SPEC §3.9: on a schema whose UNIQUE key still folds clientMsgIds (a PAD SPACE collation, as
/// migration 1 left it), the save must notice that the stored row is not this message.
#[tokio::test]
async fn a_database_that_folds_client_msg_ids_rejects_instead_of_acknowledging_without_a_row() {
    let env = TestEnv::new("fold");
    let store = store_with_padded_client_msg_ids(&env).await;
    store.save_batch(&[msg(50, 1, 2, "x", "first")]).await.unwrap();
    let out = store.save_batch(&[msg(51, 1, 2, "x ", "second"), msg(52, 1, 2, "x", "retry")]).await.unwrap();
    assert_eq!(out.saved, vec![(1, 50, 1)], "the byte-exact retry is a duplicate");
    assert_eq!(out.rejected.len(), 1, "{out:?}");
    assert_eq!(out.rejected[0].0, 0);
    store.close().await;
    env.cleanup().await;
}

/// `client_found_rows=true` makes MySQL count a duplicate as an affected row; the save must still tell
/// a duplicate from an insert and report the stored id.
#[tokio::test]
async fn duplicates_are_detected_even_when_the_url_asks_for_found_rows() {
    let env = TestEnv::new("found");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&format!("{}?client_found_rows=true", env.mysql_url), 2).unwrap();
    store.save_batch(&[msg(60, 1, 2, "a", "first")]).await.unwrap();
    let out = store.save_batch(&[msg(61, 1, 2, "a", "retry with a new id")]).await.unwrap();
    assert_eq!(out.saved, vec![(0, 60, 1)], "the retry reports the stored id");
    store.close().await;
    env.cleanup().await;
}

/// A migrated store whose `client_msg_id` is put back the way migration 1 made it (a PAD SPACE
/// collation that folds `"x"` and `"x "`).
async fn store_with_padded_client_msg_ids(env: &TestEnv) -> Store {
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    store
        .execute(
            "ALTER TABLE messages MODIFY client_msg_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
        )
        .await
        .unwrap();
    store
}

/// The pool keeps the connections it opened: two queries at once, again and again, never use more
/// server connections than the pool's maximum (a returned connection reaches the idle queue through
/// the pool's recycler task, so a round may open a second spare, never one per round). (With mysql_async's default `inactive_connection_ttl` of 0 the pool kept
/// only `min` idle connections and closed every other one on return, so each overlap opened a new
/// connection — a TCP connect, authentication, two setup queries and a reconnect over the Unix
/// socket: about 18 a second at the seed tier, most of MariaDB's CPU.)
#[tokio::test]
async fn the_pool_reuses_its_connections_instead_of_reopening_them() {
    let env = TestEnv::new("pool_reuse");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 4).unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let overlap = "SELECT CONNECTION_ID() + SLEEP(0.02)";
        let (a, b) = tokio::join!(store.query_u64(overlap), store.query_u64(overlap));
        ids.insert(a.unwrap());
        ids.insert(b.unwrap());
    }
    assert!(ids.len() <= 4, "20 rounds of 2 overlapping queries used {} server connections: {ids:?}", ids.len());
    store.close().await;
    env.cleanup().await;
}
