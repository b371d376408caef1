//! Connections: opening every pair's two at the start (bounded concurrency), and opening one again
//! after it closed (the next gateway, jittered backoff).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use im_common::backoff::Backoff;

use crate::client::{self, WsReader, WsWriter};
use crate::plan::Pair;
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
    recv_buffer: Option<u32>,
    /// The gateway currently connected to (index into `urls`).
    gateway: usize,
    /// Whether to reconnect at all.
    pub enabled: bool,
}

impl Link {
    pub fn new(target: &Target, spec: &LoadSpec, uid: u64, gateway: usize, recv_buffer: Option<u32>) -> Link {
        Link {
            uid,
            urls: target.front_door.clone().unwrap_or_else(|| FrontDoor::new(target.ws_urls.clone())),
            token: im_common::auth::issue_token(&target.jwt_secret, uid, TOKEN_TTL_SECS).into(),
            auth: spec.auth,
            timeout: spec.connect_timeout,
            recv_buffer,
            gateway,
            enabled: spec.reconnect,
        }
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
            match client::connect_with(url, &self.token, self.auth, self.timeout, self.recv_buffer).await {
                Ok(conn) => {
                    Counters::bump(&rec.counters.reconnects);
                    return Some(conn);
                }
                Err(e) => rec.error(&format!("re{}", e.label())),
            }
        }
    }
}

/// Opens every pair's two connections, at most `connect_concurrency` at a time, each on its own task
/// (the handshakes' CPU work spreads over all cores). Returns (sender, receiver) per pair.
pub(super) async fn connect_all(
    target: &Target,
    spec: &LoadSpec,
    pairs: &[Pair],
    rec: &Arc<Recorder>,
) -> Vec<(Option<Conn>, Option<Conn>)> {
    // Collected first: a borrowing iterator inside the stream would keep the future from being spawned.
    let jobs: Vec<(usize, bool, u64, usize)> = pairs
        .iter()
        .flat_map(|p| [(p.index, true, p.sender, p.sender_gateway), (p.index, false, p.receiver, p.receiver_gateway)])
        .collect();
    let attempts = futures_util::stream::iter(jobs)
        .map(|(index, is_sender, uid, gateway)| {
            let url = target.ws_urls[gateway].clone();
            let token = im_common::auth::issue_token(&target.jwt_secret, uid, TOKEN_TTL_SECS);
            let (auth, timeout, rec) = (spec.auth, spec.connect_timeout, rec.clone());
            let buffer = (!is_sender && is_slow(spec, index)).then_some(SLOW_RECV_BUFFER);
            tokio::spawn(async move {
                let began = Instant::now();
                let result = client::connect_with(&url, &token, auth, timeout, buffer).await;
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
                (index, is_sender, result.ok())
            })
        })
        .buffer_unordered(spec.connect_concurrency);
    let mut out: Vec<(Option<Conn>, Option<Conn>)> = (0..pairs.len()).map(|_| (None, None)).collect();
    let mut attempts = std::pin::pin!(attempts);
    while let Some(done) = attempts.next().await {
        match done {
            Ok((index, true, conn)) => out[index].0 = conn,
            Ok((index, false, conn)) => out[index].1 = conn,
            Err(_) => {
                Counters::bump(&rec.counters.connect_fail);
                rec.error("connect_task_failed");
            }
        }
    }
    out
}

/// The error label of a connection the gateway closed.
pub(super) fn close_label(code: u16, reason: &str) -> String {
    if reason.is_empty() {
        format!("closed_{code}")
    } else {
        format!("closed_{reason}")
    }
}
