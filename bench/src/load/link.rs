//! Connections: opening every pair's two at the start (bounded concurrency), and opening one again
//! after it closed (the next gateway, jittered backoff).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use im_common::backoff::Backoff;

use crate::client::{self, ConnectOptions, WsReader, WsWriter};
use crate::plan::{self, Pair};
use crate::recorder::{Counters, Latency, Recorder};
use crate::spec::{AuthMode, FrontDoor, LoadSpec, Target};

/// Lifetime of the tokens the bench signs.
const TOKEN_TTL_SECS: u64 = 86_400;
/// Reconnect backoff: first pause, and the most it grows to (each pause is jittered ±50 %).
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Socket receive buffer of a slow receiver.
pub(super) const SLOW_RECV_BUFFER: u32 = 4096;

/// A connection in both halves.
pub(super) type Conn = (WsReader, WsWriter);

/// Whether pair `index`'s receiver is one of the slow ones (the first `slow_receivers` share).
pub(super) fn is_slow(spec: &LoadSpec, index: usize) -> bool {
    (index as f64) < (spec.pairs() as f64 * spec.slow_receivers).round()
}

/// What a client needs to connect again after its connection closed.
#[derive(Clone)]
pub(super) struct Link {
    pub uid: u64,
    /// Where the gateways are (read again at every attempt).
    urls: FrontDoor,
    token: Arc<str>,
    auth: AuthMode,
    timeout: Duration,
    options: ConnectOptions,
    /// The gateway currently connected to (index into `urls`).
    gateway: usize,
    /// Whether to reconnect at all.
    pub enabled: bool,
}

impl Link {
    pub fn new(target: &Target, spec: &LoadSpec, uid: u64, gateway: usize, options: ConnectOptions) -> Link {
        Link {
            uid,
            urls: target.front_door.clone().unwrap_or_else(|| FrontDoor::new(target.ws_urls.clone())),
            token: im_common::auth::issue_token(&target.jwt_secret, uid, TOKEN_TTL_SECS).into(),
            auth: spec.auth,
            timeout: spec.connect_timeout,
            options,
            gateway,
            enabled: spec.reconnect,
        }
    }

    /// Whether the connection is opened with `?sync=manual`.
    pub fn manual_sync(&self) -> bool {
        self.options.manual_sync
    }

    /// Connects again, to the next gateway in the front door's list each attempt, with exponential
    /// backoff and jitter (so a gateway's clients do not all come back in the same millisecond).
    /// `None` once shutdown begins.
    pub async fn reconnect(&mut self, rec: &Recorder, shutdown: &CancellationToken) -> Option<Conn> {
        let mut backoff = Backoff::jittered(RECONNECT_FIRST, RECONNECT_MAX);
        loop {
            tokio::select! {
                _ = backoff.wait() => {}
                _ = shutdown.cancelled() => return None,
            }
            let urls = self.urls.urls();
            if urls.is_empty() {
                continue;
            }
            self.gateway = (self.gateway + 1) % urls.len();
            let url = &urls[self.gateway];
            match client::connect_with(url, &self.token, self.auth, self.timeout, self.options).await {
                Ok(conn) => {
                    Counters::bump(&rec.counters.reconnects);
                    return Some(conn);
                }
                Err(e) => rec.error(&format!("re{}", e.label())),
            }
        }
    }
}

/// How device `device` of pair `index`'s receiver connects: a slow receiver's small buffer (device 0
/// only), and `?sync=manual` for a device that syncs with its own positions.
pub(super) fn device_options(spec: &LoadSpec, pair: &Pair, device: u8) -> ConnectOptions {
    let devices = plan::devices_of(pair.receiver, spec.two_devices);
    ConnectOptions {
        recv_buffer: (device == 0 && is_slow(spec, pair.index)).then_some(SLOW_RECV_BUFFER),
        manual_sync: plan::own_positions(pair.receiver, device, devices, spec.own_positions),
        encoding: spec.encoding.encoding(),
    }
}

/// The gateway of device `device` of pair `pair`'s receiver.
pub(super) fn device_gateway(pair: &Pair, device: u8, gateways: usize) -> usize {
    if device == 0 {
        pair.receiver_gateway
    } else {
        plan::device_gateway(pair.receiver, device, gateways)
    }
}

/// One pair's connections at the start: its sender's, and one per device of its receiver.
pub(super) struct PairConns {
    pub sender: Option<Conn>,
    pub devices: Vec<Option<Conn>>,
}

/// Opens every pair's connections (its sender's, and each of its receiver's devices'), at most
/// `connect_concurrency` at a time, each on its own task (the handshakes' CPU work spreads over all
/// cores).
pub(super) async fn connect_all(
    target: &Target,
    spec: &LoadSpec,
    pairs: &[Pair],
    rec: &Arc<Recorder>,
) -> Vec<PairConns> {
    // Collected first: a borrowing iterator inside the stream would keep the future from being
    // spawned. `None` as the device: the sender.
    let gateways = target.ws_urls.len();
    let mut jobs: Vec<(usize, Option<u8>, u64, usize, ConnectOptions)> = Vec::new();
    for p in pairs {
        let sender = ConnectOptions { encoding: spec.encoding.encoding(), ..Default::default() };
        jobs.push((p.index, None, p.sender, p.sender_gateway, sender));
        for device in 0..plan::devices_of(p.receiver, spec.two_devices) {
            let options = device_options(spec, p, device);
            jobs.push((p.index, Some(device), p.receiver, device_gateway(p, device, gateways), options));
        }
    }
    let attempts = futures_util::stream::iter(jobs)
        .map(|(index, device, uid, gateway, options)| {
            let url = target.ws_urls[gateway].clone();
            let token = im_common::auth::issue_token(&target.jwt_secret, uid, TOKEN_TTL_SECS);
            let (auth, timeout, rec) = (spec.auth, spec.connect_timeout, rec.clone());
            tokio::spawn(async move {
                let began = Instant::now();
                let result = client::connect_with(&url, &token, auth, timeout, options).await;
                match &result {
                    Ok(_) => {
                        Counters::bump(&rec.counters.connect_ok);
                        Counters::bump(&rec.counters.auth_ok);
                        rec.record(Latency::Connect, began.elapsed());
                    }
                    Err(e) if e.is_auth() => {
                        Counters::bump(&rec.counters.connect_ok);
                        Counters::bump(&rec.counters.auth_fail);
                        rec.error(&e.label());
                    }
                    Err(e) => {
                        Counters::bump(&rec.counters.connect_fail);
                        rec.error(&e.label());
                    }
                }
                (index, device, result.ok())
            })
        })
        .buffer_unordered(spec.connect_concurrency);
    let mut out: Vec<PairConns> = pairs
        .iter()
        .map(|p| PairConns {
            sender: None,
            devices: (0..plan::devices_of(p.receiver, spec.two_devices)).map(|_| None).collect(),
        })
        .collect();
    let mut attempts = std::pin::pin!(attempts);
    while let Some(done) = attempts.next().await {
        match done {
            Ok((index, None, conn)) => out[index].sender = conn,
            Ok((index, Some(device), conn)) => out[index].devices[usize::from(device)] = conn,
            Err(_) => {
                Counters::bump(&rec.counters.connect_fail);
                rec.error("connect_task_failed");
            }
        }
    }
    out
}

/// The error label of a connection the gateway closed.
pub(crate) fn close_label(code: u16, reason: &str) -> String {
    if reason.is_empty() {
        format!("closed_{code}")
    } else {
        format!("closed_{reason}")
    }
}
