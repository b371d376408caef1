//! A connection's route and presence epoch against a reader of both, on a real Redis and a real
//! Redis Cluster.
//!
//! The deliver stage pushes a message to the routes it reads and records the recipient's presence
//! epoch read with them; the save stage pushes again only if that epoch moved since. So a reader
//! that sees the epoch a connection raised must also see the route that connection added: else the
//! push misses the connection, the save stage sees no new connection, and the connection's sync may
//! have read MySQL before the row was there — the message never reaches it.

use std::sync::Arc;
use std::time::Duration;

use im_common::connections::{self, RedisConn};
use im_common::protocol::Encoding;
use im_common::route_cache::RouteCache;
use im_common::router::Router;
use im_gateway::framing::{close_code, Control};
use im_gateway::outbound::{Next, Outbound};
use im_gateway::routes::RouteKeeper;
use im_gateway::sessions::{ConnHandle, Sessions};
use im_harness::env::TestEnv;

/// Users connected per test, each once, while a reader reads them in a loop.
const CONNECTIONS: u64 = 400;
const NODE: u16 = 7;

/// Route caches whose entries are kept (the deliver stage's own) and read again every time (an
/// unchanged epoch then vouches for routes read in the same round trip).
const CACHE_AGES: [Duration; 2] = [Duration::from_secs(5), Duration::ZERO];

/// A route keeper for node `NODE` in `env`, on a connection of its own, and that connection.
async fn route_keeper(env: &TestEnv) -> (RouteKeeper, RedisConn) {
    let conn = connections::connect(&env.config().redis).await.expect("Redis");
    (RouteKeeper::new(conn.clone(), env.keys(), NODE, 60_000), conn)
}

/// A connection of `user` opened in `sessions`: whether it is the user's first here, and its handle.
fn open(sessions: &Sessions, user: u64) -> (bool, ConnHandle) {
    let conn = sessions.new_handle(Arc::new(Outbound::new(8)), Encoding::Json);
    (sessions.add(user, conn.clone()), conn)
}

/// Connects `CONNECTIONS` fresh users (from `first_user` on) one after the other; for each, a
/// reader on a connection of its own reads the user's epoch and route (as publishers do, through a
/// route cache whose entries are read again after `max_age`) until it sees the epoch raised. Returns how many times
/// that read did not hold the route.
async fn epochs_seen_without_their_route(env: &TestEnv, first_user: u64, max_age: Duration) -> u64 {
    let (keeper, _) = route_keeper(env).await;
    let conn = connections::connect(&env.config().redis).await.expect("Redis");
    let router = Router::with_cache(conn, env.keys(), RouteCache::new(max_age));
    let mut misses = 0;
    for user in first_user..first_user + CONNECTIONS {
        let reader = async {
            loop {
                let (routes, epochs, _) = router.locate(&[user], None).await.expect("read");
                if epochs.get(&user).copied().unwrap_or(0) >= 1 {
                    return routes.get(&user).is_some_and(|nodes| nodes.contains(&NODE));
                }
            }
        };
        let (with_route, registered) = tokio::join!(reader, keeper.connected(user, true));
        registered.expect("register");
        if !with_route {
            misses += 1;
        }
    }
    misses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_sees_a_new_presence_epoch_sees_its_route_on_one_redis() {
    let env = TestEnv::new("presence_routes");
    for (i, max_age) in CACHE_AGES.into_iter().enumerate() {
        let misses = epochs_seen_without_their_route(&env, 1 + i as u64 * CONNECTIONS, max_age).await;
        assert_eq!(misses, 0, "{misses} of {CONNECTIONS} connections: epoch read without the route ({max_age:?})");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_sees_a_new_presence_epoch_sees_its_route_on_a_redis_cluster() {
    let env = TestEnv::on_redis_cluster("presence_routes_rc").await.expect("the tests' Redis Cluster");
    for (i, max_age) in CACHE_AGES.into_iter().enumerate() {
        let misses = epochs_seen_without_their_route(&env, 1 + i as u64 * CONNECTIONS, max_age).await;
        assert_eq!(misses, 0, "{misses} of {CONNECTIONS} connections: epoch read without the route ({max_age:?})");
    }
    env.cleanup().await;
}

/// What the readers' order relies on, seen in the commands Redis runs (`MONITOR`): a connection's
/// route is added before its presence epoch is raised — on a cluster the two go to different
/// nodes, so the route's round trip must be over before the epoch's starts.
#[tokio::test]
async fn a_new_connection_adds_its_route_before_it_raises_its_presence_epoch() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let env = TestEnv::new("presence_routes_order");
    let keys = env.keys();
    let address = env.redis_url.trim_start_matches("redis://").trim_end_matches('/').to_owned();
    let mut monitor = BufReader::new(tokio::net::TcpStream::connect(&address).await.expect("Redis"));
    monitor.get_mut().write_all(b"MONITOR\r\n").await.expect("MONITOR");
    let mut line = String::new();
    monitor.read_line(&mut line).await.expect("MONITOR answered");
    assert_eq!(line.trim_end(), "+OK");

    let (keeper, _) = route_keeper(&env).await;
    let user = 42;
    keeper.connected(user, true).await.expect("register");

    let (route, presence) = (format!("\"{}\"", keys.route(user)), format!("\"{}\"", keys.presence(user)));
    let mut order = Vec::new();
    while order.len() < 2 {
        line.clear();
        let read = tokio::time::timeout(Duration::from_secs(10), monitor.read_line(&mut line)).await;
        assert!(matches!(read, Ok(Ok(n)) if n > 0), "MONITOR ended before both commands showed; saw {order:?}");
        let command = line.to_ascii_uppercase();
        if command.contains("\"ZADD\"") && line.contains(&route) {
            order.push("route");
        } else if command.contains("\"INCR") && line.contains(&presence) {
            order.push("epoch");
        }
    }
    assert_eq!(order, ["route", "epoch"]);
    env.cleanup().await;
}

/// A user's last connection here closes while their next one arrives, and the closing one's route
/// removal runs after the arriving one added the route: the removal undoes it. Without a route the
/// live connection misses every push, and no epoch moved to have them pushed again — so once the
/// removal is done, a connection of the user still here must hold the route or be asked to
/// reconnect (1012: it registers and syncs afresh).
#[tokio::test]
async fn a_connection_whose_route_a_concurrent_removal_undid_is_asked_to_reconnect() {
    let env = TestEnv::new("presence_routes_removal");
    let keys = env.keys();
    let (keeper, conn) = route_keeper(&env).await;
    let sessions = Sessions::default();
    let user = 9;
    let (first_here, first) = open(&sessions, user);
    assert!(first_here);
    keeper.connected(user, true).await.expect("register");

    // The first connection closes: it leaves the sessions, its route removal is not sent yet…
    assert!(sessions.remove(user, first.id), "the user's last connection here");
    // …when the next one arrives and registers.
    let (first_here, next) = open(&sessions, user);
    assert!(first_here);
    keeper.connected(user, true).await.expect("register");
    // Now the removal runs.
    keeper.left(user, &sessions).await.expect("route removal");

    let nodes: Vec<u16> =
        redis::cmd("ZRANGE").arg(keys.route(user)).arg(0).arg(-1).query_async(&mut conn.clone()).await.unwrap();
    // What the connection's write task would send next, if anything is queued.
    next.out.finish();
    let asked_to_reconnect = matches!(
        next.out.next(&mut Vec::new(), 16, 1 << 20).await,
        Next::Control(Control::Close(close_code::SERVICE_RESTART, _))
    );
    assert!(
        nodes.contains(&NODE) || asked_to_reconnect,
        "a live connection with no route ({nodes:?}) and no request to reconnect"
    );
    env.cleanup().await;
}

/// A user's presence epoch expires a week after their last connection, not while one lives: were it
/// to expire under a live connection, it would count again from 1, and an epoch read before and
/// one read after could match across a new connection. Every route refresh renews it.
#[tokio::test]
async fn a_route_refresh_renews_the_users_presence_epoch() {
    let env = TestEnv::new("presence_routes_ttl");
    let keys = env.keys();
    let (keeper, conn) = route_keeper(&env).await;
    let user = 11;
    keeper.connected(user, true).await.expect("register");
    let before: u64 = redis::cmd("GET").arg(keys.presence(user)).query_async(&mut conn.clone()).await.unwrap();
    // Most of the week has passed.
    let _: () = redis::cmd("EXPIRE").arg(keys.presence(user)).arg(60).query_async(&mut conn.clone()).await.unwrap();

    keeper.register(&[user]).await.expect("refresh");

    let ttl: i64 = redis::cmd("TTL").arg(keys.presence(user)).query_async(&mut conn.clone()).await.unwrap();
    assert!(ttl > 6 * 24 * 3600, "the epoch expires in {ttl} s although the user is connected");
    let epoch: u64 = redis::cmd("GET").arg(keys.presence(user)).query_async(&mut conn.clone()).await.unwrap();
    assert_eq!(epoch, before, "a refresh renews the epoch, it does not raise it");
    env.cleanup().await;
}

/// Redis loses a user's route and presence epoch (a restart without persistence, a failover to a
/// replica that had not got them) while a publisher holds the epoch it read with the user's
/// routes. The user's next connection, on another node, raises the epoch anew: were it to count
/// from 0 again it could come back to the held value, which would vouch for the held routes — and
/// the publisher would miss the new connection.
async fn a_lost_epoch_comes_back_to_a_held_value(env: &TestEnv) -> bool {
    let keys = env.keys();
    let (keeper, conn) = route_keeper(env).await;
    let router = Router::with_cache(conn.clone(), env.keys(), RouteCache::new(Duration::from_secs(60)));
    let user = 13;
    keeper.connected(user, true).await.expect("register");
    let (routes, _, _) = router.locate(&[user], None).await.expect("read");
    assert_eq!(routes.get(&user), Some(&vec![NODE]));

    for key in [keys.route(user), keys.presence(user)] {
        let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn.clone()).await.unwrap();
    }
    let other_node = RouteKeeper::new(conn.clone(), keys.clone(), NODE + 1, 60_000);
    other_node.connected(user, true).await.expect("register");

    let (routes, _, _) = router.locate(&[user], None).await.expect("read");
    !routes.get(&user).is_some_and(|nodes| nodes.contains(&(NODE + 1)))
}

#[tokio::test]
async fn a_presence_epoch_redis_lost_does_not_come_back_to_a_value_a_publisher_holds_on_one_redis() {
    let env = TestEnv::new("presence_routes_lost");
    assert!(!a_lost_epoch_comes_back_to_a_held_value(&env).await, "the publisher misses the user's new connection");
    env.cleanup().await;
}

#[tokio::test]
async fn a_presence_epoch_redis_lost_does_not_come_back_to_a_value_a_publisher_holds_on_a_redis_cluster() {
    let env = TestEnv::on_redis_cluster("presence_routes_lost_rc").await.expect("the tests' Redis Cluster");
    assert!(!a_lost_epoch_comes_back_to_a_held_value(&env).await, "the publisher misses the user's new connection");
    env.cleanup().await;
}
