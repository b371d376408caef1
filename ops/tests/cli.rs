//! The `ops` binary as an operator uses it: `up` on a machine where nothing answers on the configured
//! ports (private Redis and MariaDB get started), a refused second `up`, `token`, `migrate`, `down`.

use std::path::Path;
use std::process::{Command, Output};

use im_ops::cluster::{http_get, load_state, pid_alive};
use im_ops::servers::free_port;

fn ops(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ops")).arg("--config").arg(config).args(args).output().expect("ops runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_private_servers_when_none_answer_and_down_stops_everything() {
    let dir = std::env::temp_dir().join(format!("im-ops-cli-{}-{:x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("im.toml");
    let (redis_port, mysql_port) = (free_port(), free_port());
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"redis://127.0.0.1:{redis_port}\"\nkey_prefix = \"opscli\"\n\
             [mysql]\nurl = \"mysql://root@127.0.0.1:{mysql_port}/im\"\n\
             [auth]\njwt_secret = \"cli-test-secret-0123456789-0123456789\"\n"
        ),
    )
    .unwrap();
    let state_path = dir.join("cluster.json");
    let state_arg = state_path.to_str().unwrap();

    let up = ops(&config, &["up", "--gateways", "1", "--shards", "1", "--mode", "full", "--state", state_arg]);
    assert!(up.status.success(), "ops up failed: {}", text(&up));
    let state = load_state(&state_path).unwrap();
    assert_eq!(state.private_servers.len(), 2, "both servers were started privately");
    assert!(state.redis_url.contains("127.0.0.1") && !state.redis_url.ends_with(&format!(":{redis_port}")));
    let readyz = state.gateways[0].metrics_url.replace("/metrics", "/readyz");
    assert_eq!(http_get(&readyz).await.map(|(s, _)| s), Some(200));

    let again = ops(&config, &["up", "--state", state_arg]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already running"), "{}", text(&again));

    let token = ops(&config, &["token", "--user", "42"]);
    let token = String::from_utf8(token.stdout).unwrap();
    assert_eq!(im_common::auth::verify_token("cli-test-secret-0123456789-0123456789", token.trim()), Ok(42));

    let down = ops(&config, &["down", "--state", state_arg]);
    assert!(down.status.success(), "ops down failed: {}", text(&down));
    let pids = state.gateways.iter().map(|g| g.pid).chain(state.workers.iter().map(|w| w.pid));
    let pids: Vec<u32> = pids.chain(state.private_servers.iter().map(|s| s.pid)).collect();
    assert!(pids.iter().all(|&p| !pid_alive(p)), "every process stopped");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let dir = std::env::temp_dir().join(format!("im-ops-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[cluster]\nshards = 0\n").unwrap();
    let out = ops(&config, &["token", "--user", "1"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cluster.shards"), "{}", text(&out));
    let out = ops(&config, &["token", "--user", "abc"]);
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).ok();
}
