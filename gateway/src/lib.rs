//! The gateway: stateless WebSocket front end of the engine.
//!
//! A tour, in the order a message meets them: [`server`] accepts HTTP and upgrades `/ws`;
//! [`connection`] runs one client's frames in order, read by [`frame_reader`], queued in [`outbound`]
//! and written by [`framing`]; [`Gateway::send`] claims the message's idempotency key and hands it
//! to [`append`] (two-phase: the shard's stream, then `ACK(accepted)`) or [`baseline`] (a
//! group-committed INSERT, then `ACK(saved)` and [`fanout`]);
//! [`outbox`] holds baseline pushes while Redis is away. Pushes and receipts from shard workers and
//! other gateways arrive on this node's [`node_channel`] and reach [`sessions`]; [`routes`] tells the
//! cluster which users are here; [`sync`] sends a device what it misses, per conversation by seq;
//! [`positions`] records delivered/read positions and relays `RECEIPT`s; [`history`] and
//! [`conversations`] serve saved messages and the conversation list over HTTP; [`demo`] serves the
//! demo chat page built on the reference JS client.

pub mod admission;
pub mod append;
pub mod append_batch;
pub mod baseline;
pub mod connection;
pub mod conversations;
pub mod demo;
pub mod fanout;
pub mod frame_reader;
pub mod framing;
pub mod gathering;
pub mod history;
pub mod node_channel;
pub mod outbound;
pub mod outbox;
pub mod positions;
pub mod rate_limit;
pub mod receipt_watch;
pub mod routes;
pub mod server;
pub mod sessions;
pub mod sync;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use im_common::config::{Config, Mode};
use im_common::idempotency::IdempotencyWindow;
use im_common::ids::IdGenerator;
use im_common::keys::Keys;
use im_common::node_lease::{NodeLease, NODE_LEASE_TTL};
use im_common::protocol::{SendRequest, ServerFrame};
use im_common::record::{ChatMessage, Origin};
use im_common::router::Router;
use im_common::shard::shard_of;
use im_common::store::Store;
use im_common::telemetry::ReadinessCheck;
use im_common::StartError;

use append::Appender;
use baseline::{AfterCommit, BaselineSaver};
use fanout::Fanout;
use outbox::Outbox;
use positions::Positions;
use receipt_watch::ReceiptWatch;
use routes::RouteKeeper;
use sessions::{ConnHandle, Sessions};

/// Everything a gateway's tasks share.
pub struct Gateway {
    pub cfg: Config,
    pub mode: Mode,
    pub node: u16,
    pub keys: Keys,
    pub ids: Arc<IdGenerator>,
    pub store: Store,
    pub sessions: Arc<Sessions>,
    pub routes: RouteKeeper,
    pub idempotency: IdempotencyWindow,
    pub saver: BaselineSaver,
    pub appender: Appender,
    pub fanout: Arc<Fanout>,
    pub positions: Arc<Positions>,
    pub metrics: PrometheusHandle,
    pub readiness: ReadinessCheck,
    pub connection_slots: Arc<Semaphore>,
    pub shutdown: watch::Receiver<bool>,
}

impl Gateway {
    /// Handles one validated `SINGLE_CHAT` from `uid` on connection `conn`: the frames to answer with.
    pub async fn send(&self, uid: u64, conn: &ConnHandle, req: SendRequest) -> Vec<ServerFrame> {
        let shard = shard_of(uid, self.cfg.cluster.shards);
        let key = self.idempotency_key(uid, &req.client_msg_id);
        let msg = ChatMessage {
            id: self.ids.next_id(),
            from: uid,
            to: req.to,
            client_msg_id: req.client_msg_id,
            msg_type: req.msg_type,
            body: req.body,
            seq: 0,
        };
        if self.mode != Mode::Baseline {
            let origin = Origin { node: self.node, conn: conn.id };
            return self.appender.append(shard, &key, msg, origin, &self.sessions.ledger).await;
        }
        self.saver.claim_and_save(key, msg).await
    }

    /// The idempotency key of `uid`'s `client_msg_id` (in the sender's shard).
    pub fn idempotency_key(&self, uid: u64, client_msg_id: &str) -> String {
        self.keys.idempotency(shard_of(uid, self.cfg.cluster.shards), uid, client_msg_id)
    }
}

/// Claims this gateway's node id before it serves anything (`im_common::node_lease`): refused while
/// another live process holds it; started without the lease (taken later) while Redis is down.
pub async fn claim_node_id(cfg: &Config) -> Result<NodeLease, StartError> {
    // Its own connection: renewals must not queue behind appends.
    let redis = im_common::connections::connect_lazy(&cfg.redis)?;
    Ok(NodeLease::claim(redis, &Keys::from_config(cfg), cfg.gateway.node_id, NODE_LEASE_TTL).await?)
}

/// Builds the gateway and serves `listener` until `shutdown` turns true; then closes every
/// connection with 1001 and flushes delivered/read positions. `ids` is the generator of the node id this
/// process holds ([`claim_node_id`]).
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    metrics: PrometheusHandle,
    ids: Arc<IdGenerator>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let node = cfg.gateway.node_id;
    let keys = Keys::from_config(&cfg);
    // Lazy: a fail-open gateway must come up (and serve baseline) while Redis is down.
    let redis = im_common::connections::connect_lazy(&cfg.redis)?;
    let store = Store::connect(&cfg.mysql.url, cfg.mysql.pool_max)?;
    let sessions = Arc::new(Sessions::default());
    let routes = RouteKeeper::new(redis.clone(), keys.clone(), node, cfg.gateway.route_ttl_ms);
    let idempotency = IdempotencyWindow::new(redis.clone(), cfg.idempotency.ttl_secs);
    let router = Router::new(redis.clone(), keys.clone());
    let outbox = Arc::new(Outbox::default());
    let fanout = Arc::new(Fanout { router: router.clone(), outbox, sessions: sessions.clone(), node });
    let after = AfterCommit {
        idempotency: idempotency.clone(),
        fanout: fanout.clone(),
        keys: keys.clone(),
        shards: cfg.cluster.shards,
        claim_paths: cfg.mode() != Mode::Baseline,
    };
    let saver = BaselineSaver::start(store.clone(), after, (cfg.mysql.pool_max / 2).max(1), cfg.mysql.insert_batch_max);
    let deps = im_common::health::Dependencies::watch(redis.clone(), store.clone());
    let receipts = ReceiptWatch { window: idempotency.clone(), sessions: sessions.clone() };
    let appender = Appender::new(&cfg, redis.clone(), keys.clone(), saver.clone(), deps.clone(), receipts);
    let subscribed = Arc::new(AtomicBool::new(false));
    let readiness: ReadinessCheck = {
        let subscribed = subscribed.clone();
        Arc::new(move || {
            deps.check()?;
            if subscribed.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("node channel not subscribed".into())
            }
        })
    };
    let gw = Arc::new(Gateway {
        mode: cfg.mode(),
        node,
        ids,
        keys: keys.clone(),
        store: store.clone(),
        sessions: sessions.clone(),
        routes: routes.clone(),
        idempotency,
        saver,
        appender,
        fanout,
        positions: Arc::new(Positions::default()),
        metrics,
        readiness,
        connection_slots: Arc::new(Semaphore::new(cfg.gateway.max_connections)),
        shutdown: shutdown.clone(),
        cfg,
    });
    let reasons = im_common::protocol::Reason::ALL.iter().map(|r| r.as_str().to_owned()).collect();
    im_common::telemetry::register_metrics(&[
        ("im_gateway_errors_total", "reason", reasons),
        (
            "im_gateway_server_busy_total",
            "cause",
            vec![
                "backlog".into(),
                "redis_unavailable".into(),
                "in_flight".into(),
                "overload".into(),
                "append_unknown".into(),
            ],
        ),
        ("im_gateway_auth_total", "result", vec!["ok".into(), "fail".into()]),
        ("im_gateway_fail_open_total", "", vec![]),
        ("im_gateway_slow_consumer_disconnects_total", "", vec![]),
        ("im_gateway_replayed_pushes_total", "", vec![]),
        ("im_gateway_pushes_dropped_total", "", vec![]),
        ("im_gateway_route_lapses_total", "", vec![]),
        ("im_gateway_route_removal_races_total", "", vec![]),
        ("im_gateway_routes_restored_total", "", vec![]),
    ]);
    metrics::gauge!("im_build_info", "version" => env!("CARGO_PKG_VERSION"), "mode" => gw.mode.as_str(), "process" => "gateway")
        .set(1.0);
    let background = [
        tokio::spawn(node_channel::subscribe(
            routes.clone(),
            gw.cfg.redis.clone(),
            gw.cfg.cluster.shards,
            sessions.clone(),
            subscribed,
        )),
        tokio::spawn(gw.saver.outbox.clone().republish(router, gw.idempotency.clone(), node)),
        tokio::spawn(routes.heartbeat(sessions.clone())),
        tokio::spawn(gw.positions.clone().flush_every(
            store.clone(),
            gw.fanout.clone(),
            Duration::from_millis(gw.cfg.gateway.cursor_flush_ms),
        )),
        tokio::spawn(gw.appender.clone().refresh_backlog()),
    ];
    server::accept_loop(gw.clone(), listener).await;

    // Drain: connections see the shutdown flag and close with 1001; give them a moment to finish.
    sessions.close_all(framing::close_code::GOING_AWAY, "going_away");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while sessions.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.positions.flush(&store, &gw.fanout).await;
    for task in background {
        task.abort();
    }
    Ok(())
}
