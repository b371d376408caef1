//! The SQL layer against a real MariaDB/MySQL: migrations, batched saves, duplicates, rejections.

use im_common::record::ChatMessage;
use im_common::store::{migrate, Store};
use im_harness::env::TestEnv;

fn msg(id: u64, from: u64, to: u64, cmid: &str, body: &str) -> ChatMessage {
    ChatMessage { id, from, to, client_msg_id: cmid.into(), msg_type: "TEXT".into(), body: body.into() }
}

#[tokio::test]
async fn migrations_apply_once_and_record_their_versions() {
    let env = TestEnv::new("migrate");
    assert_eq!(migrate(&env.mysql_url).await.unwrap(), vec![1]);
    assert_eq!(migrate(&env.mysql_url).await.unwrap(), Vec::<u32>::new(), "second run applies nothing");
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM schema_migrations").await.unwrap(), 1);
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
    assert_eq!(first.saved, vec![(0, 10)]);

    let batch = [
        msg(11, 1, 2, "b", "one"),
        msg(12, 1, 2, "a", "retry of a with a new id"), // same sender + clientMsgId as id 10
        msg(13, 3, 2, "c", "POISON"),
        msg(14, 3, 1, "d", "three"),
        msg(11, 1, 2, "b", "one"), // the same message twice in one batch
    ];
    let out = store.save_batch(&batch).await.unwrap();
    assert_eq!(out.saved, vec![(0, 11), (1, 10), (3, 14), (4, 11)], "duplicates report the stored id");
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

#[tokio::test]
async fn inbox_pages_follow_the_delivered_cursor() {
    let env = TestEnv::new("inbox");
    migrate(&env.mysql_url).await.unwrap();
    let store = Store::connect(&env.mysql_url, 2).unwrap();
    store.save_batch(&[msg(20, 1, 5, "x", "1"), msg(21, 2, 5, "y", "2"), msg(22, 1, 6, "z", "3")]).await.unwrap();
    assert_eq!(store.delivered_cursor(5).await.unwrap(), 0);
    let page: Vec<u64> = store.inbox_between(5, 0, u64::MAX, 10).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(page, vec![20, 21]);
    store.advance_cursors(&[(5, 20), (6, 22)]).await.unwrap();
    store.advance_cursors(&[(5, 3)]).await.unwrap(); // never moves back
    assert_eq!(store.delivered_cursor(5).await.unwrap(), 20);
    let page: Vec<u64> = store.inbox_between(5, 20, 22, 10).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(page, vec![21]);
    store.close().await;
    env.cleanup().await;
}
