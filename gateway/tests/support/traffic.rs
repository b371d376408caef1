//! A small traffic generator and checker for end-to-end tests: fixed sender → receiver pairs, every
//! receipt and push recorded, then verdicts on loss, duplicates and per-sender order. (The `bench`
//! tool does the same at scale; this one is sized for tests.)

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// What to send.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    /// Sender/receiver pairs: sender `base + 2i` sends to `base + 2i + 1`.
    pub pairs: usize,
    pub per_sender: usize,
    pub base_uid: u64,
    /// Pause between one sender's messages.
    pub pace: Duration,
    /// Whether to expect `ACK(accepted)` receipts.
    pub expect_accepted: bool,
    /// How long to wait for everything to arrive.
    pub deadline: Duration,
}

/// What one sender saw.
#[derive(Debug, Default)]
pub struct SenderLog {
    pub uid: u64,
    pub accepted: HashMap<String, String>,
    pub saved: HashMap<String, String>,
    pub errors: Vec<(String, String)>,
}

/// What one receiver saw: (serverMsgId, clientMsgId) in arrival order.
#[derive(Debug, Default)]
pub struct ReceiverLog {
    pub uid: u64,
    pub pushes: Vec<(String, String)>,
}

/// Everything seen in one run.
#[derive(Debug, Default)]
pub struct Traffic {
    pub senders: Vec<SenderLog>,
    pub receivers: Vec<ReceiverLog>,
}

/// Verdict of a run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub sent: usize,
    pub accepted: usize,
    pub saved: usize,
    pub delivered: usize,
    /// Got a receipt but never reached the receiver.
    pub lost: usize,
    pub duplicate_deliveries: usize,
    /// Receivers that saw a sender's messages out of order (first occurrences).
    pub reorders: usize,
    pub errors: usize,
}

fn cmid(k: usize) -> String {
    format!("c{k:05}")
}

/// Runs the traffic: receivers connect first, then every sender sends its messages.
pub async fn run(ws_urls: &[String], secret: &str, spec: &TrafficSpec) -> Traffic {
    let n = ws_urls.len();
    let mut receivers = Vec::new();
    for i in 0..spec.pairs {
        let uid = spec.base_uid + 2 * i as u64 + 1;
        let url = ws_urls[(i + 1) % n].clone();
        let (expect, deadline) = (spec.per_sender, spec.deadline);
        let ws = connect(&url, secret, uid).await;
        receivers.push(tokio::spawn(receive(ws, uid, expect, deadline)));
    }
    let mut senders = Vec::new();
    for i in 0..spec.pairs {
        let uid = spec.base_uid + 2 * i as u64;
        let ws = connect(&ws_urls[i % n], secret, uid).await;
        senders.push(tokio::spawn(send(ws, uid, uid + 1, spec.clone())));
    }
    let mut t = Traffic::default();
    for s in senders {
        t.senders.push(s.await.expect("sender task"));
    }
    for r in receivers {
        t.receivers.push(r.await.expect("receiver task"));
    }
    t
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, secret: &str, uid: u64) -> Ws {
    let token = im_common::auth::issue_token(secret, uid, 3600);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.expect("handshake").0
}

async fn send(ws: Ws, uid: u64, to: u64, spec: TrafficSpec) -> SenderLog {
    let (mut tx, mut rx) = ws.split();
    let writer = tokio::spawn(async move {
        for k in 0..spec.per_sender {
            let frame = json!({"type": "SINGLE_CHAT", "to": to, "clientMsgId": cmid(k), "msgType": "TEXT", "body": format!("{uid}:{k}")});
            if tx.send(Message::Text(frame.to_string().into())).await.is_err() {
                break;
            }
            tokio::time::sleep(spec.pace).await;
        }
        tx
    });
    let mut log = SenderLog { uid, ..Default::default() };
    let end = Instant::now() + spec.deadline;
    // ACK(saved) may overtake ACK(accepted) (they travel different paths), so wait for both.
    let done = |log: &SenderLog| {
        let answered = log.saved.len() + log.errors.len() >= spec.per_sender;
        answered && (!spec.expect_accepted || log.accepted.len() + log.errors.len() >= spec.per_sender)
    };
    while !done(&log) {
        let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout_at(end, rx.next()).await else { break };
        let v: Value = serde_json::from_str(&text).unwrap();
        let (c, id) =
            (v["clientMsgId"].as_str().unwrap_or("").to_owned(), v["serverMsgId"].as_str().unwrap_or("").to_owned());
        match (v["type"].as_str(), v["ackType"].as_str()) {
            (Some("ACK"), Some("accepted")) => {
                log.accepted.insert(c, id);
            }
            (Some("ACK"), Some("saved")) => {
                log.saved.insert(c, id);
            }
            (Some("ERROR"), _) => log.errors.push((v["reason"].as_str().unwrap_or("").to_owned(), c)),
            _ => {}
        }
    }
    let _ = writer.await;
    log
}

async fn receive(ws: Ws, uid: u64, expect: usize, deadline: Duration) -> ReceiverLog {
    let (_tx, mut rx) = ws.split();
    let mut log = ReceiverLog { uid, ..Default::default() };
    let mut distinct = HashSet::new();
    let end = Instant::now() + deadline;
    while distinct.len() < expect {
        let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end, rx.next()).await else { break };
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "SINGLE_CHAT" {
                let id = v["serverMsgId"].as_str().unwrap().to_owned();
                distinct.insert(id.clone());
                log.pushes.push((id, v["clientMsgId"].as_str().unwrap().to_owned()));
            }
        }
    }
    // Linger briefly so late duplicates are counted too.
    while let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(Duration::from_millis(200), rx.next()).await {
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] == "SINGLE_CHAT" {
            log.pushes
                .push((v["serverMsgId"].as_str().unwrap().to_owned(), v["clientMsgId"].as_str().unwrap().to_owned()));
        }
    }
    log
}

impl Traffic {
    /// Counts what happened (see [`Verdict`]).
    pub fn verdict(&self, per_sender: usize) -> Verdict {
        let mut v = Verdict { sent: self.senders.len() * per_sender, ..Default::default() };
        for (s, r) in self.senders.iter().zip(&self.receivers) {
            v.accepted += s.accepted.len();
            v.saved += s.saved.len();
            v.errors += s.errors.len();
            let mut seen = HashSet::new();
            let mut last = None;
            let mut reordered = false;
            for (id, c) in &r.pushes {
                if !seen.insert(id.clone()) {
                    v.duplicate_deliveries += 1;
                    continue;
                }
                if last.is_some_and(|l: &String| c <= l) {
                    reordered = true;
                }
                last = Some(c);
            }
            v.delivered += seen.len();
            v.reorders += usize::from(reordered);
            let receipted: HashSet<&String> = s.accepted.values().chain(s.saved.values()).collect();
            v.lost += receipted.iter().filter(|id| !seen.contains(id.as_str())).count();
        }
        v
    }
}

/// Per-sender order and uniqueness of the saved rows: (rows, duplicate rows, senders out of order).
pub async fn check_rows(store: &im_common::store::Store) -> (usize, usize, usize) {
    let rows = store.all_ids().await.unwrap();
    let mut by_sender: HashMap<u64, Vec<&String>> = HashMap::new();
    let mut keys = HashSet::new();
    let mut dups = 0;
    for (from, _id, c) in &rows {
        if !keys.insert((from, c)) {
            dups += 1;
        }
        by_sender.entry(*from).or_default().push(c);
    }
    let out_of_order = by_sender.values().filter(|cs| cs.windows(2).any(|w| w[0] >= w[1])).count();
    (rows.len(), dups, out_of_order)
}
