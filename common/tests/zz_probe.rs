#[test]
fn probe_config_speed() {
    use im_common::config::Config;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/config_loader/defaults.toml")).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..1000 { let _ = Config::from_toml(""); }
    println!("from_toml(empty): {:?}/call", t.elapsed() / 1000);
    let t = std::time::Instant::now();
    for _ in 0..1000 { let _ = Config::from_toml(&text); }
    println!("from_toml(defaults): {:?}/call", t.elapsed() / 1000);
    let cfg = Config::default();
    let t = std::time::Instant::now();
    for _ in 0..1000 { let _ = cfg.validate(); }
    println!("validate: {:?}/call", t.elapsed() / 1000);
    let t = std::time::Instant::now();
    for _ in 0..1000 { let _ = mysql_async::Opts::from_url(&cfg.mysql.url); }
    println!("mysql from_url: {:?}/call", t.elapsed() / 1000);
    let t = std::time::Instant::now();
    for _ in 0..1000 { let _ = toml::to_string(&cfg); }
    println!("to_string: {:?}/call", t.elapsed() / 1000);
}
