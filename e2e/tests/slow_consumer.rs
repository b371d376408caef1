//! Bounded memory (SPEC §3.6) over real sockets in baseline mode: a receiver that stops reading is
//! disconnected once its outbound queue is full, and the latency of everyone else on the same gateway
//! stays where it was.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use e2e::TestEnv;
use e2e::{cluster_with, connect_small_buffer, exchange, metric, Client, WAIT};
use im_common::config::Mode;

const HEALTHY_SENDER: u64 = 1;
const HEALTHY_RECEIVER: u64 = 2;
const FLOODER: u64 = 10;
const SLOW_SOON: u64 = 20;
const SLOW_LATE: u64 = 21;
const QUEUE: usize = 16;
const BODY_CHARS: usize = 16_000; // the largest body the TEXT column holds is 16,383 characters
/// Most flood messages sent before giving up on seeing the slow consumer dropped (~32 MB).
const FLOOD_CAP: usize = 1000;
const SAMPLES: usize = 20;

/// One round trip of the healthy pair: (send → ACK(saved) at the sender, send → push at the receiver).
async fn sample(sender: &mut Client, receiver: &mut Client, cmid: &str) -> (Duration, Duration) {
    let started = Instant::now();
    sender.chat(receiver.uid, cmid, "ping-pong").await;
    tokio::join!(
        async {
            sender.ack("saved", cmid).await;
            started.elapsed()
        },
        async {
            receiver.expect(cmid, |v| v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == cmid).await;
            started.elapsed()
        },
    )
}

/// (p50, max) in milliseconds.
fn summary(samples: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

/// Reads what a slow client finds once it reads again, until its connection ends: (pushes, the
/// close frame if one came). Panics if the connection is still open after [`WAIT`].
async fn read_until_end(client: &mut Client) -> (usize, Option<Option<(u16, String)>>) {
    let mut got = 0;
    loop {
        match tokio::time::timeout(WAIT, client.inner().next()).await {
            // Flood messages only (not the connect-time SYNC_DONE, which may come after the PONG).
            Ok(Some(Ok(Message::Text(text)))) => got += usize::from(text.contains("\"SINGLE_CHAT\"")),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (got, Some(frame.map(|f| (u16::from(f.code), f.reason.to_string()))));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (got, None),
            Err(_) => panic!("uid {}: connection still open after {got} frames", client.uid),
        }
    }
}

/// The TCP state (as in `/proc/net/tcp`: 1 = ESTABLISHED) of the gateway's side of `client`'s
/// connection, or `None` once the kernel has forgotten it.
fn gateway_side_tcp_state(client: &mut Client) -> Option<u8> {
    let MaybeTlsStream::Plain(stream) = client.inner().get_ref() else { panic!("plain TCP expected") };
    let (local, peer) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        (port(fields[1]) == Some(peer.port()) && port(fields[2]) == Some(local.port()))
            .then(|| u8::from_str_radix(fields[3], 16).unwrap())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_without_slowing_others() {
    let env = TestEnv::new("slow_consumer");
    let c = cluster_with(&env, Mode::Baseline, 1, 1, |cfg| {
        cfg.gateway.outbound_queue = QUEUE;
        cfg.gateway.max_body_chars = BODY_CHARS;
        cfg.gateway.rate_per_sec = 100_000;
        cfg.gateway.rate_burst = 100_000;
    })
    .await;
    let g = &c.state.gateways[0];
    let secret = &c.state.jwt_secret;
    let mut sender = Client::connect(&g.ws_url, secret, HEALTHY_SENDER).await;
    let mut receiver = Client::connect(&g.ws_url, secret, HEALTHY_RECEIVER).await;
    let mut flooder = Client::connect(&g.ws_url, secret, FLOODER).await;
    // Two receivers that will stop reading: one comes back soon, one only after the gateway gave up.
    let mut soon = connect_small_buffer(&g.ws_url, secret, SLOW_SOON).await;
    let mut late = connect_small_buffer(&g.ws_url, secret, SLOW_LATE).await;
    for client in [&mut sender, &mut receiver, &mut flooder, &mut soon, &mut late] {
        client.ping().await;
    }
    let connections = |url: String| async move { metric(&url, "im_gateway_connections").await };
    assert_eq!(connections(g.metrics_url.clone()).await, 5.0);

    // The healthy pair's latency with nothing else going on.
    exchange(&mut sender, &mut receiver, "warm-up").await;
    let mut before = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let (ack, push) = sample(&mut sender, &mut receiver, &format!("before-{i}")).await;
        before.0.push(ack);
        before.1.push(push);
    }

    // The slow receivers read nothing more; the flooder sends them large messages in turn (reading its
    // own receipts, a window at a time) until the gateway has dropped both and the pair has its samples.
    let sampled = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let (sampled, metrics_url) = (sampled.clone(), g.metrics_url.clone());
        async move {
            let body = "z".repeat(BODY_CHARS);
            let mut sent = 0;
            while sent < FLOOD_CAP {
                for i in sent..sent + 8 {
                    flooder.chat([SLOW_SOON, SLOW_LATE][i % 2], &format!("flood-{i}"), &body).await;
                }
                for i in sent..sent + 8 {
                    flooder.ack("saved", &format!("flood-{i}")).await;
                }
                sent += 8;
                if sampled.load(Ordering::Relaxed) && connections(metrics_url.clone()).await == 3.0 {
                    break;
                }
            }
            (flooder, sent)
        }
    });
    let mut during = (Vec::new(), Vec::new());
    let mut i = 0;
    while !flood.is_finished() {
        let (ack, push) = sample(&mut sender, &mut receiver, &format!("during-{i}")).await;
        during.0.push(ack);
        during.1.push(push);
        i += 1;
        if i == SAMPLES {
            sampled.store(true, Ordering::Relaxed);
        }
    }
    let (mut flooder, sent) = flood.await.unwrap();
    let flood_ended = Instant::now();
    let kicks = metric(&g.metrics_url, "im_gateway_slow_consumer_disconnects_total").await;

    let (before_ack, before_push) = (summary(&before.0), summary(&before.1));
    let (during_ack, during_push) = (summary(&during.0), summary(&during.1));
    println!(
        "healthy pair, {} samples before / {} during a flood of {sent} x {BODY_CHARS} chars (p50 / max ms):\n  \
         ACK(saved): before {:.1} / {:.1}, during {:.1} / {:.1}\n  \
         push:       before {:.1} / {:.1}, during {:.1} / {:.1}",
        before.0.len(),
        during.0.len(),
        before_ack.0,
        before_ack.1,
        during_ack.0,
        during_ack.1,
        before_push.0,
        before_push.1,
        during_push.0,
        during_push.1,
    );
    // The gateway let go of both slow connections while they still read nothing.
    assert!(kicks >= 2.0, "{sent} messages of {BODY_CHARS} chars and the slow receivers were not both dropped");
    assert_eq!(connections(g.metrics_url.clone()).await, 3.0, "a slow consumer is still held by the gateway");
    assert!(during.0.len() >= SAMPLES, "only {} samples during the flood", during.0.len());
    for (what, (b50, _), (d50, dmax)) in [("ACK(saved)", before_ack, during_ack), ("push", before_push, during_push)] {
        assert!(dmax < 1000.0, "{what}: max {dmax:.1} ms during the flood");
        assert!(d50 <= 10.0 * b50 + 50.0, "{what}: p50 {d50:.1} ms during the flood vs {b50:.1} ms before");
    }

    // Reading again soon, a slow client finds part of the flood, then close 4001 `slow_consumer`
    // (or, if the close frame could not be written, the end of the stream).
    let per_receiver = sent / 2;
    let (got, end) = read_until_end(&mut soon).await;
    println!("prompt reader got {got} of its {per_receiver} messages, then {end:?}");
    assert!(got < per_receiver, "the slow consumer got everything: nothing was dropped");
    if let Some(frame) = end {
        assert_eq!(frame, Some((4001, "slow_consumer".to_owned())));
    }
    // One that never reads again is not waited for: once the gateway's close grace (5 s) has passed,
    // the connection is gone and reading finds only what was already in flight.
    let let_go = im_harness::poll::until_true(Duration::from_secs(12).saturating_sub(flood_ended.elapsed()), || {
        gateway_side_tcp_state(&mut late) != Some(1)
    })
    .await;
    assert!(let_go, "the gateway still holds the unread connection open");
    println!("the gateway closed the unread connection {:.1} s after the flood", flood_ended.elapsed().as_secs_f64());
    let (got, end) = read_until_end(&mut late).await;
    println!("late reader got {got} of its {per_receiver} messages, then {end:?}");
    assert!(got < per_receiver, "the late slow consumer got everything: nothing was dropped");

    // Everyone else carries on, and a slow client recovers by reconnecting: the offline resend brings
    // its whole share of the flood, oldest first.
    exchange(&mut sender, &mut receiver, "after").await;
    exchange(&mut flooder, &mut receiver, "flooder-still-here").await;
    let mut soon = Client::connect(&g.ws_url, secret, SLOW_SOON).await;
    for i in (0..sent).step_by(2) {
        let cmid = format!("flood-{i}");
        let push = soon.expect(&cmid, |v| v["type"] == "SINGLE_CHAT").await;
        assert_eq!(push["clientMsgId"], cmid.as_str(), "resend out of order");
    }
    soon.ping().await;
    drop(c);
}
