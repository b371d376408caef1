//! Loading, overrides and validation of the configuration.

use super::*;

fn key_error(text: &str) -> String {
    match Config::from_toml(text) {
        Err(ConfigError::Key { key, .. }) => key,
        other => panic!("expected a key error, got {other:?}"),
    }
}

#[test]
fn empty_config_is_valid_and_full_mode() {
    let cfg = Config::from_toml("").unwrap();
    assert_eq!(cfg.mode(), Mode::Full);
    assert_eq!(cfg.gateway.max_body_chars, 4096);
}

#[test]
fn bad_values_name_their_key() {
    assert_eq!(key_error("[cluster]\nshards = 0"), "cluster.shards");
    assert_eq!(key_error("[two_phase]\nenabled = \"yes\""), "two_phase.enabled");
    assert_eq!(key_error("[gateway]\nnode_id = 5000"), "gateway.node_id");
    assert_eq!(key_error("[gateway]\nlisten = \"nowhere\""), "gateway.listen");
    assert_eq!(key_error("[mysql]\nurl = \"http://x\""), "mysql.url");
    assert_eq!(key_error("[auth]\njwt_secret = \"short\""), "auth.jwt_secret");
    let unknown = Config::from_toml("[gateway]\nlisten_port = 1").unwrap_err().to_string();
    assert!(unknown.contains("gateway") && unknown.contains("listen_port"), "{unknown}");
}

fn message(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

#[test]
fn the_idempotency_window_is_never_zero_nor_shorter_than_a_database_outage() {
    // SPEC §3.9: with 0 the append script fails after its XADD: appended AND failed open.
    assert_eq!(key_error("[idempotency]\nttl_secs = 0"), "idempotency.ttl_secs");
    assert_eq!(key_error("[idempotency]\nttl_secs = 60"), "idempotency.ttl_secs");
    assert_eq!(key_error("[idempotency]\nttl_secs = 3599"), "idempotency.ttl_secs");
    Config::from_toml("[idempotency]\nttl_secs = 3600").unwrap();
    let env = [("IM__IDEMPOTENCY__TTL_SECS".to_owned(), "0".to_owned())];
    let err = Config::load_with_env(None, env).unwrap_err().to_string();
    assert!(err.contains("idempotency.ttl_secs"), "{err}");
}

#[test]
fn a_blocked_stream_read_returns_inside_the_lease_safety_margin() {
    // The owner stops acting 1/5 of the TTL before its lease can expire; a read it started just
    // before that must return (block, then the partial-batch wait) before a standby can take over.
    assert_eq!(key_error("[two_phase]\nblock_ms = 0"), "two_phase.block_ms");
    assert_eq!(key_error("[two_phase]\nlease_ttl_ms = 5000\nblock_ms = 2500"), "two_phase.block_ms");
    assert_eq!(
        key_error("[two_phase]\nlease_ttl_ms = 5000\nblock_ms = 990\nmax_batch_delay_ms = 20"),
        "two_phase.block_ms"
    );
    Config::from_toml("[two_phase]\nlease_ttl_ms = 5000\nblock_ms = 980\nmax_batch_delay_ms = 20").unwrap();
    let msg = message("[two_phase]\nlease_ttl_ms = 1500");
    assert!(msg.contains("two_phase.lease_ttl_ms") && msg.contains("300"), "{msg}");
    Config::from_toml("[two_phase]\nlease_ttl_ms = 1500\nblock_ms = 250").unwrap();
}

#[test]
fn zero_bounds_and_batches_are_refused() {
    assert_eq!(key_error("[two_phase]\nmax_backlog = 0"), "two_phase.max_backlog");
    assert_eq!(key_error("[two_phase]\nbatch_size = 0"), "two_phase.batch_size");
    assert_eq!(key_error("[mysql]\ninsert_batch_max = 0"), "mysql.insert_batch_max");
    assert_eq!(key_error("[mysql]\npool_max = 0"), "mysql.pool_max");
    assert_eq!(key_error("[gateway]\nmax_connections = 0"), "gateway.max_connections");
    assert_eq!(key_error("[gateway]\noutbound_queue = 0"), "gateway.outbound_queue");
}

#[test]
fn stream_names_are_distinct_and_outside_the_other_shard_keys() {
    assert_eq!(key_error("[two_phase]\nto_save_stream = \"accepted\""), "two_phase.to_save_stream");
    assert_eq!(key_error("[two_phase]\ndead_letter_stream = \"to_save\""), "two_phase.dead_letter_stream");
    assert_eq!(key_error("[two_phase]\naccepted_stream = \"lease\""), "two_phase.accepted_stream");
    assert_eq!(key_error("[two_phase]\naccepted_stream = \"idem:1\""), "two_phase.accepted_stream");
}

#[test]
fn urls_and_origins_are_checked() {
    assert_eq!(key_error("[redis]\nurl = \"redis://\""), "redis.url");
    assert_eq!(key_error("[redis]\ncluster_urls = [\"http://127.0.0.1:7000\"]"), "redis.cluster_urls");
    assert_eq!(key_error("[redis]\ncluster_urls = [\"redis://127.0.0.1:7000/2\"]"), "redis.cluster_urls");
    Config::from_toml("[redis]\ncluster_urls = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001/\"]").unwrap();
    assert_eq!(key_error("[mysql]\nurl = \"mysql://root@127.0.0.1:3306\""), "mysql.url");
    assert_eq!(key_error("[gateway]\nallowed_origins = [\"https://chat.example/\"]"), "gateway.allowed_origins");
    assert_eq!(key_error("[gateway]\nallowed_origins = [\"chat.example\"]"), "gateway.allowed_origins");
    Config::from_toml("[gateway]\nallowed_origins = [\"https://chat.example\", \"http://localhost:3000\"]").unwrap();
}

#[test]
fn client_found_rows_in_the_mysql_url_is_refused() {
    // It makes MySQL count a duplicate as an affected row, which hides duplicates from the save.
    let msg = message("[mysql]\nurl = \"mysql://root@127.0.0.1:3306/im?client_found_rows=true\"");
    assert!(msg.contains("mysql.url") && msg.contains("client_found_rows"), "{msg}");
    Config::from_toml("[mysql]\nurl = \"mysql://root@127.0.0.1:3306/im?client_found_rows=false\"").unwrap();
}

#[test]
fn the_demo_is_off_by_default_and_dev_tokens_need_the_page_and_a_loopback_listener() {
    let cfg = Config::default();
    assert!(!cfg.gateway.demo_page && !cfg.gateway.demo_dev_tokens, "production gets neither unless asked");
    assert_eq!(key_error("[gateway]\ndemo_dev_tokens = true"), "gateway.demo_dev_tokens");
    let open = "[gateway]\ndemo_page = true\ndemo_dev_tokens = true\nlisten = \"0.0.0.0:8080\"";
    assert!(message(open).contains("loopback"), "{}", message(open));
    Config::from_toml("[gateway]\ndemo_page = true\ndemo_dev_tokens = true\nlisten = \"127.0.0.1:0\"").unwrap();
    Config::from_toml("[gateway]\ndemo_page = true\nlisten = \"0.0.0.0:8080\"").unwrap();
}

#[test]
fn the_jwt_secret_has_at_least_32_bytes() {
    // RFC 7518 §3.2: an HS256 key has at least as many bits as the hash output (256).
    let msg = message(&format!("[auth]\njwt_secret = \"{}\"", "s".repeat(31)));
    assert!(msg.contains("auth.jwt_secret") && msg.contains("32"), "{msg}");
    Config::from_toml(&format!("[auth]\njwt_secret = \"{}\"", "s".repeat(32))).unwrap();
    assert!(Config::default().auth.jwt_secret.len() >= 32, "the default secret is long enough");
    // The tests' TestEnv secret is checked where TestEnv lives (harness/src/env.rs).
}

#[test]
fn environment_overrides_the_file() {
    let env = [
        ("IM__TWO_PHASE__ENABLED".to_owned(), "false".to_owned()),
        ("IM__REDIS__KEY_PREFIX".to_owned(), "t1".to_owned()),
        ("IM__CLUSTER__SHARDS".to_owned(), "8".to_owned()),
        ("PATH".to_owned(), "/bin".to_owned()),
    ];
    let cfg = Config::load_with_env(None, env).unwrap();
    assert_eq!((cfg.mode(), cfg.redis.key_prefix.as_str(), cfg.cluster.shards), (Mode::Baseline, "t1", 8));
    let bad = Config::load_with_env(None, [("IM__CLUSTER__SHARDS".to_owned(), "many".to_owned())]).unwrap_err();
    assert!(bad.to_string().contains("cluster.shards"), "{bad}");
}

#[test]
fn override_with_a_malformed_name_names_the_variable() {
    // Found by the property tests: these used to fail as "config key ``" or "config key `gateway.`".
    for var in ["IM__", "IM__GATEWAY__", "IM__GATEWAY____LISTEN", "IM____X"] {
        let err = Config::load_with_env(None, [(var.to_owned(), "0".to_owned())]).unwrap_err();
        assert!(matches!(&err, ConfigError::Key { key, .. } if key == var), "{var}: {err:?}");
    }
    // Also found by them: a variable that digs into a plain value used to be reported as `...jm_`.
    let env = [("IM__.".to_owned(), "1".to_owned()), ("IM__.__.Jm_".to_owned(), "2".to_owned())];
    let err = Config::load_with_env(None, env).unwrap_err();
    assert!(matches!(&err, ConfigError::Key { key, .. } if key == "IM__.__.Jm_"), "{err:?}");
    let env =
        [("IM__CLUSTER__SHARDS".to_owned(), "8".to_owned()), ("IM__CLUSTER__SHARDS__MAX".to_owned(), "9".to_owned())];
    let err = Config::load_with_env(None, env).unwrap_err().to_string();
    assert!(err.contains("IM__CLUSTER__SHARDS__MAX") && err.contains("`shards`"), "{err}");
}
