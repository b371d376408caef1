//! A test's [`TestEnv`] removes what the test wrote — its database and every key under its prefix —
//! when it is dropped, also when the test panics halfway.

use std::panic::AssertUnwindSafe;

use mysql_async::prelude::Queryable;

use im_harness::env::TestEnv;
use im_harness::servers::mysql_server_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_no_database_and_no_keys_behind() {
    let env = TestEnv::new("leak");
    im_common::store::migrate(&env.mysql_url).await.expect("the test database is created");
    let key = env.keys().route(7);
    let mut redis =
        redis::Client::open(env.redis_url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET").arg(&key).arg("x").query_async(&mut redis).await.unwrap();
    let database = env.mysql_url.rsplit('/').next().unwrap().to_owned();
    let server = mysql_server_url(&env.mysql_url);

    let outcome = std::panic::catch_unwind(AssertUnwindSafe(move || {
        let _env = env;
        panic!("a test that fails halfway");
    }));
    assert!(outcome.is_err());

    let exists: u32 = redis::cmd("EXISTS").arg(&key).query_async(&mut redis).await.unwrap();
    assert_eq!(exists, 0, "{key} was deleted");
    let mut mysql = mysql_async::Conn::from_url(server.as_str()).await.unwrap();
    let left: Option<u32> = mysql
        .exec_first("SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = ?", (database.as_str(),))
        .await
        .unwrap();
    assert_eq!(left, Some(0), "database {database} was dropped");
    mysql.disconnect().await.unwrap();
}
