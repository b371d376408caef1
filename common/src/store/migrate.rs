//! Schema migrations: the embedded files in `migrations/`, applied in order under a named lock, and
//! the database a test drops when it is done.

use mysql_async::prelude::*;
use mysql_async::{Opts, OptsBuilder};

use super::StoreError;

/// Embedded migrations: (version, name, SQL). Append only; never edit an applied one.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "messages", include_str!("../../../migrations/0001_messages.sql")),
    (2, "client_msg_id_bytes", include_str!("../../../migrations/0002_client_msg_id_bytes.sql")),
    (3, "sequences", include_str!("../../../migrations/0003_sequences.sql")),
    (4, "last_in_seq", include_str!("../../../migrations/0004_last_in_seq.sql")),
    (5, "path_claims", include_str!("../../../migrations/0005_path_claims.sql")),
    (6, "path_claims_raised", include_str!("../../../migrations/0006_path_claims_raised.sql")),
    (7, "conversations_last_out", include_str!("../../../migrations/0007_conversations_last_out.sql")),
];

/// Creates the database named in `url` if it is missing, then applies pending migrations in order.
/// Safe to run concurrently (a named lock serialises runners) and repeatedly. Returns the versions
/// it applied.
pub async fn migrate(url: &str) -> Result<Vec<u32>, StoreError> {
    let opts = Opts::from_url(url).map_err(|e| StoreError::Url(e.to_string()))?;
    let db = opts.db_name().ok_or_else(|| StoreError::Url("the URL names no database".into()))?.to_owned();
    if db.contains('`') {
        return Err(StoreError::Url(format!("unusable database name {db:?}")));
    }
    let server = mysql_async::Conn::new(OptsBuilder::from_opts(opts.clone()).db_name(None::<String>)).await?;
    let mut server = server;
    server.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4")).await?;
    server.disconnect().await?;

    let mut conn = mysql_async::Conn::new(opts).await?;
    let locked: Option<i64> = conn.query_first("SELECT GET_LOCK('im_migrate', 60)").await?;
    if locked != Some(1) {
        return Err(StoreError::Transient("could not take the migration lock".into()));
    }
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INT UNSIGNED PRIMARY KEY, name VARCHAR(255) NOT NULL, \
         applied_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3))",
    )
    .await?;
    let done: Vec<u32> = conn.query("SELECT version FROM schema_migrations").await?;
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        for statement in split_statements(sql) {
            conn.query_drop(statement).await?;
        }
        conn.exec_drop("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (version, name)).await?;
        applied.push(version);
    }
    conn.query_drop("DO RELEASE_LOCK('im_migrate')").await?;
    conn.disconnect().await?;
    Ok(applied)
}

/// Statements of a migration file: split at `;` ending a line, `--` comment lines dropped.
fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.trim().is_empty() {
        out.push(current);
    }
    out
}

/// Drops the database named in `url` (tests clean up after themselves with it).
pub async fn drop_database(url: &str) -> Result<(), StoreError> {
    let opts = Opts::from_url(url).map_err(|e| StoreError::Url(e.to_string()))?;
    let Some(db) = opts.db_name().map(str::to_owned) else { return Ok(()) };
    let mut conn = mysql_async::Conn::new(OptsBuilder::from_opts(opts).db_name(None::<String>)).await?;
    conn.query_drop(format!("DROP DATABASE IF EXISTS `{db}`")).await?;
    conn.disconnect().await?;
    Ok(())
}
