//! What to run ([`LoadSpec`]) and what to run it against ([`Target`]).
//!
//! Both are plain data so the CLI, `compare`, `sweep` and the tests build them the same way. A target
//! normally comes from the cluster state file that `ops up` (or [`im_harness::cluster::start`]) writes:
//! it lists every gateway's WebSocket URL, the JWT secret, the MySQL URL for the row check, the
//! mode, and the pids whose CPU time the report adds up.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use im_common::config::Mode;
use im_harness::cluster::ClusterState;
use im_harness::process;
use im_harness::servers::PrivateServer;

use im_common::protocol::Encoding;

use crate::cpu::ProcessRef;
use crate::redis_nodes::RedisClusterNodes;
use crate::BenchError;

/// How connections authenticate (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// `Authorization: Bearer <jwt>` at the handshake; a bad token is an HTTP 401.
    Header,
    /// `?auth=frame`, then an `AUTH {token}` first frame answered by `AUTH_OK` / `AUTH_FAIL`.
    Frame,
}

impl AuthMode {
    /// `header` or `frame`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Header => "header",
            AuthMode::Frame => "frame",
        }
    }
}

/// What the bench's connections speak (SPEC §4): JSON text frames, or MessagePack binary frames
/// negotiated by the `msgpack` subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WireEncoding {
    #[default]
    Json,
    Msgpack,
}

impl WireEncoding {
    /// `json` or `msgpack`.
    pub fn as_str(self) -> &'static str {
        match self {
            WireEncoding::Json => "json",
            WireEncoding::Msgpack => "msgpack",
        }
    }

    /// The protocol's encoding.
    pub fn encoding(self) -> Encoding {
        match self {
            WireEncoding::Json => Encoding::Json,
            WireEncoding::Msgpack => Encoding::MsgPack,
        }
    }
}

/// How receivers confirm deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReceiverAcks {
    /// As a client written from docs/PROTOCOL.md: `ACK {ackType:"delivered", from, seq}` per
    /// conversation whose position moved, at most one round per device per 100 ms, never past a gap.
    Seq,
    /// The older form: `ACK {ackType:"delivered", serverMsgId}` for the highest serverMsgId seen so
    /// far, at most one per device per 100 ms.
    Id,
    /// Never: the server's positions never move, so every reconnect syncs everything again
    /// (duplicates), and senders get no receipts.
    None,
}

impl ReceiverAcks {
    /// Whether receivers confirm at all (so senders are owed receipts).
    pub fn confirms(self) -> bool {
        self != ReceiverAcks::None
    }
}

/// Receivers that come and go while the load sends: every device stays connected for a random
/// time (exponential, mean `online_mean`), closes its connection, stays away for a random time
/// between `offline.0` and `offline.1`, and connects again. Seeded: device `d` of user `u` draws
/// from `seed`, `u` and `d` alone. Devices stop leaving when the load stops sending.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    pub online_mean: Duration,
    pub offline: (Duration, Duration),
    pub seed: u64,
}

/// The load one run offers.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Connections (= users). Half are senders, half receivers, in fixed pairs.
    pub connections: usize,
    /// Each sender's fixed interval between messages (open loop), or its minimum spacing (closed loop).
    pub interval: Duration,
    /// Closed loop: a sender's next message waits for the previous one's `ACK(saved)` (or error).
    pub closed_loop: bool,
    /// Body size in bytes (at least the few bytes that carry the send time).
    pub body_bytes: usize,
    /// Pause between the last connection coming up and the first send. The gateway's offline resend
    /// runs at connect time, concurrently with live pushes; a message saved before a slow resend
    /// reads the inbox is pushed twice. A second of settling keeps a steady-state measurement free of
    /// that connect-time race; 0 reproduces it.
    pub settle: Duration,
    /// Sending before the measured window; these messages are checked but not in the latency figures.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// After the last send, the longest wait for receipts and deliveries still in flight.
    pub drain: Duration,
    /// Most connections being opened at once.
    pub connect_concurrency: usize,
    /// Limit on one connection attempt (TCP, handshake, auth and the first PING round trip).
    pub connect_timeout: Duration,
    pub auth: AuthMode,
    pub encoding: WireEncoding,
    /// First user id of the run; `None` takes a fresh one from the clock ([`crate::plan::fresh_base_uid`]).
    pub base_uid: Option<u64>,
    /// Progress line to stderr this often; `None` for silence.
    pub progress: Option<Duration>,
    /// Prefix of progress lines (the arm in a comparison).
    pub label: String,
    /// A client whose connection closes reconnects (to the next gateway in the list, with backoff and
    /// jitter); a sender then resends every message without `ACK(saved)` under the same clientMsgId.
    /// Off: a closed connection stays closed, as in a plain benchmark.
    pub reconnect: bool,
    /// Fraction (0..=1) of receivers that read slowly: they pause `slow_read_delay` after every frame
    /// and keep a small socket receive buffer, so the gateway's outbound queue for them fills up.
    /// Their pushes are kept out of the end-to-end latency figures.
    pub slow_receivers: f64,
    /// A slow receiver's pause after each frame it reads.
    pub slow_read_delay: Duration,
    /// Each sender stops after this many messages, even before the window ends (`None`: it sends
    /// until the window ends). A test that wants an exact count sets it with a window long enough.
    pub messages_per_sender: Option<usize>,
    /// How receivers confirm what they got ([`ReceiverAcks`]; by default as a real client does:
    /// `ACK delivered` by `from` + `seq`, coalesced per conversation). Read it through
    /// [`LoadSpec::receiver_acks`].
    pub acks: ReceiverAcks,
    /// Deprecated (before issue 12 this was how receivers were made to confirm): `true` makes them
    /// confirm with the older `ACK {serverMsgId}` form ([`ReceiverAcks::Id`]) whatever `acks` says.
    pub ack_delivered: bool,
    /// Receivers also confirm `read` (with each delivered confirmation, same position).
    pub ack_read: bool,
    /// Fraction (0..=1) of receiving users with two devices (two connections, each with its own
    /// log, each owed every message). Their devices always sync with their own positions after a
    /// reconnect, as docs/PROTOCOL.md tells a second device to: the server's positions are per user.
    pub two_devices: f64,
    /// Fraction (0..=1) of the other receiving devices that connect with `?sync=manual` and send
    /// their own positions (`SYNC {positions}`) instead of relying on the server's sync at connect.
    pub own_positions: f64,
    /// Receivers disconnect and reconnect at random while the load sends ([`Churn`]); `None`: never.
    pub churn: Option<Churn>,
    /// Crossed conversations: every sender sends its odd-numbered messages to the next pair's
    /// receiver, so every receiver hears from two senders, whose messages' ids interleave — the
    /// traffic in which one delivered cursor per user over serverMsgIds can skip a message.
    pub crossed: bool,
    /// Where a drill orders reconnect storms (a share of the connections closed at once; they come
    /// back through [`LoadSpec::reconnect`], which a storm needs). `None`: never.
    pub storm: Option<crate::load::ReconnectStorm>,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            connections: 2000,
            interval: Duration::from_millis(3000),
            closed_loop: false,
            body_bytes: 64,
            settle: Duration::from_secs(1),
            warmup: Duration::from_secs(3),
            duration: Duration::from_secs(20),
            drain: Duration::from_secs(10),
            connect_concurrency: 256,
            connect_timeout: Duration::from_secs(10),
            auth: AuthMode::Header,
            encoding: WireEncoding::Json,
            base_uid: None,
            progress: Some(Duration::from_secs(5)),
            label: String::new(),
            reconnect: false,
            slow_receivers: 0.0,
            slow_read_delay: Duration::from_millis(200),
            messages_per_sender: None,
            acks: ReceiverAcks::Seq,
            ack_delivered: false,
            ack_read: false,
            two_devices: 0.0,
            own_positions: 0.0,
            churn: None,
            crossed: false,
            storm: None,
        }
    }
}

/// Largest number of connections in one run: fresh user ids are handed out in blocks of this size
/// per millisecond of start time, so runs never share a user (see [`crate::plan::fresh_base_uid`]).
pub const MAX_CONNECTIONS: usize = 100_000;

impl LoadSpec {
    /// Sender/receiver pairs (an odd connection count leaves the last one out).
    pub fn pairs(&self) -> usize {
        self.connections / 2
    }

    /// Offered load in messages per second (open loop; an upper bound in closed loop).
    pub fn offered_rate(&self) -> f64 {
        self.pairs() as f64 / self.interval.as_secs_f64()
    }

    /// The interval that makes `pairs` senders offer `rate` messages per second in total.
    pub fn interval_for_rate(pairs: usize, rate: f64) -> Duration {
        Duration::from_secs_f64(pairs as f64 / rate.max(f64::MIN_POSITIVE))
    }

    /// How receivers confirm: [`LoadSpec::acks`], or the older id form with the deprecated
    /// [`LoadSpec::ack_delivered`].
    pub fn receiver_acks(&self) -> ReceiverAcks {
        if self.ack_delivered {
            ReceiverAcks::Id
        } else {
            self.acks
        }
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::InvalidSpec(m.to_owned()));
        if self.pairs() == 0 {
            return bad("--connections must be at least 2 (one sender, one receiver)");
        }
        if self.connections > MAX_CONNECTIONS {
            return bad(&format!("--connections is at most {MAX_CONNECTIONS} per run"));
        }
        if self.interval.is_zero() && !self.closed_loop {
            return bad("--interval-ms must be positive in open loop");
        }
        if self.duration.is_zero() {
            return bad("--duration-secs must be positive");
        }
        if self.body_bytes > 4096 {
            return bad("--body-bytes above the gateway's default body limit (4096)");
        }
        if !(0.0..=1.0).contains(&self.slow_receivers) {
            return bad("the slow receiver fraction must be between 0 and 1");
        }
        if self.messages_per_sender == Some(0) {
            return bad("a sender must send at least one message");
        }
        if self.connect_concurrency == 0 {
            return bad("--connect-concurrency must be positive");
        }
        if self.storm.is_some() && !self.reconnect {
            return bad("reconnect storms need reconnecting clients (LoadSpec::reconnect)");
        }
        if self.churn.is_some() && !self.reconnect {
            return bad("receiver churn needs reconnecting clients (LoadSpec::reconnect)");
        }
        if !(0.0..=1.0).contains(&self.two_devices) || !(0.0..=1.0).contains(&self.own_positions) {
            return bad("the two-device and own-position fractions must be between 0 and 1");
        }
        if self.ack_read && self.receiver_acks() != ReceiverAcks::Seq {
            return bad("read confirmations go by from + seq (--acks seq)");
        }
        Ok(())
    }
}

/// The gateways' WebSocket URLs as a load balancer in front of them knows them. A gateway that is
/// restarted comes back on a new port; a drill that restarts one updates the list, and clients that
/// reconnect read it, so they find the gateway again instead of knocking on its old port.
#[derive(Debug, Clone, Default)]
pub struct FrontDoor(Arc<RwLock<Vec<String>>>);

impl FrontDoor {
    pub fn new(urls: Vec<String>) -> FrontDoor {
        FrontDoor(Arc::new(RwLock::new(urls)))
    }

    /// Replaces the list (a gateway came back on another port).
    pub fn set(&self, urls: Vec<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = urls;
    }

    /// The list now.
    pub fn urls(&self) -> Vec<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A running cluster as the bench sees it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Every gateway's WebSocket URL (`ws://host:port/ws`) at the start.
    pub ws_urls: Vec<String>,
    /// Where reconnecting clients look the gateways up (`None`: `ws_urls`, which never change).
    pub front_door: Option<FrontDoor>,
    pub jwt_secret: String,
    /// Where the row check reads; `None` skips it.
    pub mysql_url: Option<String>,
    /// Decides whether `ACK(accepted)` is expected.
    pub mode: Mode,
    /// Processes whose CPU time is reported.
    pub processes: Vec<ProcessRef>,
    /// The Redis Cluster the cluster runs on, whose masters' command counts the report adds
    /// (`None` on one Redis server).
    pub redis_cluster: Option<RedisClusterNodes>,
}

impl Target {
    /// The target described by a cluster state file: its gateways and workers, plus the Redis and
    /// MariaDB processes (the cluster's private ones, or else those listening on its URLs' ports) —
    /// on a Redis Cluster, every node's (`redis-<port>`).
    pub fn from_state(state: &ClusterState) -> Result<Target, BenchError> {
        let mode = Mode::parse(&state.mode)
            .ok_or_else(|| BenchError::InvalidSpec(format!("state file names unknown mode {:?}", state.mode)))?;
        if state.gateways.is_empty() {
            return Err(BenchError::InvalidSpec("the cluster has no gateways".into()));
        }
        let mut processes: Vec<ProcessRef> =
            state.gateways.iter().map(|g| ProcessRef { name: format!("gateway-{}", g.node_id), pid: g.pid }).collect();
        for (i, w) in state.workers.iter().enumerate() {
            let name = w.shard.map_or_else(|| format!("worker-standby-{i}"), |s| format!("worker-s{s}"));
            processes.push(ProcessRef { name, pid: w.pid });
        }
        processes.extend(redis_processes(state));
        processes.extend(server_processes(
            &state.private_servers,
            "mariadb",
            &state.mysql_url,
            3306,
            &["mariadbd", "mysqld"],
        ));
        Ok(Target {
            ws_urls: state.gateways.iter().map(|g| g.ws_url.clone()).collect(),
            front_door: None,
            jwt_secret: state.jwt_secret.clone(),
            mysql_url: Some(state.mysql_url.clone()),
            mode,
            processes,
            redis_cluster: RedisClusterNodes::from_state(state),
        })
    }

    /// Whether the mode sends `ACK(accepted)` before `ACK(saved)`.
    pub fn two_phase(&self) -> bool {
        self.mode != Mode::Baseline
    }
}

/// The Redis processes of a cluster: on a Redis Cluster every node, named `redis-<port>` (the
/// private nodes by their handles, a configured cluster's by the ports its URLs name); on one server,
/// that server (`redis-server`).
fn redis_processes(state: &ClusterState) -> Vec<ProcessRef> {
    let Some(redis_cluster) = &state.redis_cluster else {
        return server_processes(&state.private_servers, "redis", &state.redis_url, 6379, &["redis-server"]);
    };
    let node_name = |port: u16| format!("redis-{port}");
    if !redis_cluster.nodes.is_empty() {
        return redis_cluster.nodes.iter().map(|n| ProcessRef { name: node_name(n.port), pid: n.pid }).collect();
    }
    let mut found = Vec::new();
    for url in &redis_cluster.urls {
        let port = crate::cpu::url_port(url, 6379);
        match process::listener_pid(port) {
            Some(pid) => found.push(ProcessRef { name: node_name(port), pid }),
            // Not visible (another user's process): every Redis server is the best guess.
            None => {
                let known: Vec<u32> = found.iter().map(|p| p.pid).collect();
                let others =
                    crate::cpu::find_by_comm(&["redis-server"]).into_iter().filter(|p| !known.contains(&p.pid));
                return found.into_iter().chain(others).collect();
            }
        }
    }
    found
}

/// The server of `kind` (`redis`, `mariadb`) serving `url`: the private one among `private` by its
/// handle (named after the first of `names`), else the one listening on `url`'s port, else every
/// process named one of `names`.
pub(crate) fn server_processes(
    private: &[PrivateServer],
    kind: &str,
    url: &str,
    default_port: u16,
    names: &[&str],
) -> Vec<ProcessRef> {
    if let Some(private) = private.iter().find(|s| s.kind_name == kind) {
        let name = names.first().copied().unwrap_or(kind);
        return vec![ProcessRef { name: name.to_owned(), pid: private.pid }];
    }
    match process::listener_pid(crate::cpu::url_port(url, default_port)) {
        Some(pid) => vec![ProcessRef { name: process::comm(pid).unwrap_or_default(), pid }],
        // Not visible (another user's process): every server of that kind is the best guess.
        None => crate::cpu::find_by_comm(names),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use im_harness::cluster::{GatewayProc, WorkerProc};
    use im_harness::servers::{PrivateServer, RedisClusterInUse};

    use super::*;

    fn server(kind: &str, port: u16, pid: u32) -> PrivateServer {
        PrivateServer {
            kind_name: kind.into(),
            port,
            pid,
            dir: PathBuf::from(format!("/nonexistent/{kind}-{port}")),
            url: format!("redis://127.0.0.1:{port}"),
            appendfsync: Some("everysec".into()),
            cluster_bus_port: (kind == "redis").then_some(port + 1),
        }
    }

    fn state(redis_cluster: Option<RedisClusterInUse>, private_servers: Vec<PrivateServer>) -> ClusterState {
        let dir = PathBuf::from("/nonexistent/cluster");
        ClusterState {
            gateways: vec![GatewayProc {
                node_id: 1,
                ws_url: "ws://127.0.0.1:1/ws".into(),
                http_url: "http://127.0.0.1:1".into(),
                metrics_url: "http://127.0.0.1:1/metrics".into(),
                pid: 11,
                log: dir.join("gateway-1.log"),
            }],
            workers: vec![WorkerProc {
                shard: Some(0),
                metrics_url: "http://127.0.0.1:2/metrics".into(),
                pid: 12,
                log: dir.join("worker-0.log"),
            }],
            redis_url: "redis://127.0.0.1:7001".into(),
            mysql_url: "mysql://root@127.0.0.1:3307/im".into(),
            jwt_secret: "x".into(),
            key_prefix: "im".into(),
            mode: "full".into(),
            shards: 1,
            config_path: dir.join("cluster.toml"),
            dir,
            private_servers,
            dashboard: None,
            redis_cluster,
        }
    }

    fn names(target: &Target) -> Vec<(String, u32)> {
        target.processes.iter().map(|p| (p.name.clone(), p.pid)).collect()
    }

    #[test]
    fn every_node_of_a_private_redis_cluster_is_accounted_by_its_port() {
        let nodes = vec![server("redis", 7001, 21), server("redis", 7003, 22), server("redis", 7005, 23)];
        let urls = nodes.iter().map(|n| n.url.clone()).collect();
        let redis_cluster = RedisClusterInUse { urls, nodes };
        let target = Target::from_state(&state(Some(redis_cluster), vec![server("mariadb", 3307, 31)])).unwrap();
        let expected =
            [("gateway-1", 11), ("worker-s0", 12), ("redis-7001", 21), ("redis-7003", 22), ("redis-7005", 23)];
        let expected: Vec<(String, u32)> =
            expected.iter().chain(&[("mariadbd", 31)]).map(|&(n, p)| (n.to_owned(), p)).collect();
        assert_eq!(names(&target), expected);
        let watched = target.redis_cluster.expect("the Redis Cluster's nodes are watched");
        assert_eq!(watched.urls.len(), 3);
    }

    #[test]
    fn one_private_redis_server_keeps_its_name_and_no_nodes_are_watched() {
        let servers = vec![server("redis", 7001, 21), server("mariadb", 3307, 31)];
        let target = Target::from_state(&state(None, servers)).unwrap();
        let tail: Vec<(String, u32)> = names(&target).split_off(2);
        assert_eq!(tail, [("redis-server".to_owned(), 21), ("mariadbd".to_owned(), 31)]);
        assert!(target.redis_cluster.is_none());
    }
}
