//! The batched append script against a real Redis: what it answers per message.

use im_common::connections;
use im_common::idempotency::{encode_state, Stage};
use im_gateway::append_batch::{Append, AppendBatcher, Appended};
use im_harness::env::TestEnv;

/// A message Redis refuses inside the script (here its key holds a list) is answered `Refused`, with
/// nothing appended for it, and does not take the other messages of its batch down: they are
/// appended, or answered with their earlier state. Only a refusal says for sure that nothing was
/// appended — what fail-open needs to save a message on the baseline path while Redis answers.
// One thread: the four appends are all queued before the batching task first runs, so they share
// one script call.
#[tokio::test]
async fn a_message_redis_refuses_is_answered_alone_and_the_rest_of_its_batch_is_appended() {
    let env = TestEnv::new("append_batch");
    let cfg = env.config();
    let keys = env.keys();
    let conn = connections::connect(&cfg.redis).await.expect("Redis");
    let mut raw = conn.clone();
    let key = |cmid: &str| keys.idempotency(0, 1, cmid);
    let _: i64 = redis::cmd("RPUSH").arg(key("wrong")).arg("x").query_async(&mut raw).await.unwrap();
    let _: () =
        redis::cmd("SET").arg(key("earlier")).arg(encode_state(Stage::Saved, 7)).query_async(&mut raw).await.unwrap();

    let batcher = AppendBatcher::start(conn.clone(), &keys, 1);
    let append = |cmid: &str, id: u64| Append {
        key: key(cmid),
        state: encode_state(Stage::Accepted, id),
        payload: format!("payload {cmid}").into_bytes(),
    };
    let (a, wrong, earlier, b) = tokio::join!(
        batcher.append(0, append("a", 1)),
        batcher.append(0, append("wrong", 2)),
        batcher.append(0, append("earlier", 3)),
        batcher.append(0, append("b", 4)),
    );
    assert_eq!(a.unwrap(), Appended::New);
    assert!(matches!(wrong.unwrap(), Appended::Refused(e) if e.starts_with("WRONGTYPE")));
    assert_eq!(earlier.unwrap(), Appended::Earlier(encode_state(Stage::Saved, 7)));
    assert_eq!(b.unwrap(), Appended::New);
    let len: usize = redis::cmd("XLEN").arg(keys.accepted_stream(0)).query_async(&mut raw).await.unwrap();
    assert_eq!(len, 2, "a and b appended; nothing for the refused or the earlier one");
    let kind: String = redis::cmd("TYPE").arg(key("wrong")).query_async(&mut raw).await.unwrap();
    assert_eq!(kind, "list", "the refused message's key is untouched");
    env.cleanup().await;
}

/// A message whose XADD Redis refuses (here the stream key holds a string) is answered `Refused`
/// and leaves no claim behind (the script claims a key only once its XADD succeeded). Its resend,
/// once the stream can be written, is appended as new — not answered with the state of an attempt
/// that never reached the stream.
#[tokio::test]
async fn a_message_whose_append_fails_leaves_no_claim_and_its_resend_is_appended() {
    let env = TestEnv::new("append_batch_refused_xadd");
    let cfg = env.config();
    let keys = env.keys();
    let conn = connections::connect(&cfg.redis).await.expect("Redis");
    let mut raw = conn.clone();
    let key = keys.idempotency(0, 1, "m");
    let stream = keys.accepted_stream(0);
    let _: () = redis::cmd("SET").arg(&stream).arg("not a stream").query_async(&mut raw).await.unwrap();

    let batcher = AppendBatcher::start(conn.clone(), &keys, 1);
    let append = || Append { key: key.clone(), state: encode_state(Stage::Accepted, 5), payload: b"m".to_vec() };
    let refused = batcher.append(0, append()).await.unwrap();
    assert!(matches!(&refused, Appended::Refused(e) if e.starts_with("WRONGTYPE")), "{refused:?}");
    let exists: bool = redis::cmd("EXISTS").arg(&key).query_async(&mut raw).await.unwrap();
    assert!(!exists, "the refused message left no claim");

    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut raw).await.unwrap();
    assert_eq!(batcher.append(0, append()).await.unwrap(), Appended::New);
    let len: usize = redis::cmd("XLEN").arg(&stream).query_async(&mut raw).await.unwrap();
    assert_eq!(len, 1);
    let state: String = redis::cmd("GET").arg(&key).query_async(&mut raw).await.unwrap();
    assert_eq!(state, encode_state(Stage::Accepted, 5));
    env.cleanup().await;
}
