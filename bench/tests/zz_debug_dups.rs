// Throwaway diagnostics (deleted before hand-off).
use std::time::Duration;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn debug_dups() {
    let state = im_ops::cluster::load_state(std::path::Path::new("/tmp/bench-smoke/cluster.json")).unwrap();
    let target = im_bench::Target::from_state(&state).unwrap();
    let load = im_bench::LoadSpec { connections: 200, interval: Duration::from_millis(500), warmup: Duration::from_secs(1), duration: Duration::from_secs(3), progress: None, ..Default::default() };
    let r = im_bench::run_load(&target, &load).await.unwrap();
    println!("verdict {:?}", r.verdict);
    for rl in &r.receivers {
        let mut seen = std::collections::HashMap::new();
        for (pos, d) in rl.deliveries.iter().enumerate() {
            if let Some(first) = seen.insert(d.seq, pos) {
                let s = r.senders.iter().find(|s| s.uid == d.from).unwrap();
                let m = &s.messages[d.seq as usize];
                println!("dup: receiver {} seq {} first at {first} again at {pos} of {}; sent_at {} us; ids {:?}", rl.uid, d.seq, rl.deliveries.len(), m.sent_at_us, (m.accepted, m.saved, d.server_msg_id));
            }
        }
    }
}
