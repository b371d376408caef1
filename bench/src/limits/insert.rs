//! The engine's save, raw: multi-row INSERTs into the `messages` table, one statement of
//! [`ROWS_PER_INSERT`] rows per transaction, on long-lived connections.
//!
//! The table is the engine's own: the project's migrations create it in the scratch database. The
//! statement is the save stage's (same columns, binary protocol with placeholders, `ON DUPLICATE KEY
//! UPDATE id = id`) without the conversation upsert that follows it there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Opts, Params, Pool, TxOpts, Value};

use super::model::{Measurement, Op};
use super::window::{measure, pace, CpuScope, Drive, Workers};
use super::{LimitsError, Scratch, CONNECTIONS, PAYLOAD_BYTES};

/// Rows per INSERT statement (and per transaction).
pub const ROWS_PER_INSERT: usize = 100;
/// The columns the save stage writes.
const COLUMNS: [&str; 7] = ["id", "from_user_id", "to_user_id", "seq", "client_msg_id", "msg_type", "content"];

/// Batched INSERTs into the scratch database's `messages` table (created by the migrations): of
/// [`ROWS_PER_INSERT`] rows flat out, of a save batch's rows paced.
pub async fn insert_rows(scratch: &Scratch, secs: Duration, drive: Drive) -> Result<Measurement, LimitsError> {
    im_common::store::migrate(&scratch.mysql_url).await?;
    let pool = Pool::new(Opts::from_url(&scratch.mysql_url).map_err(|e| LimitsError::Mysql(e.to_string()))?);
    let per_insert = match drive {
        Drive::FlatOut => ROWS_PER_INSERT,
        Drive::Paced { rows_per_insert, .. } => rows_per_insert.max(1),
    };
    let statement = insert_statement(per_insert);
    let next_id = Arc::new(AtomicU64::new(1));
    let mut workers = Workers::new();
    for worker in 0..CONNECTIONS as u64 {
        let mut conn = pool.get_conn().await?;
        let (done, stop, next_id, statement) =
            (workers.done.clone(), workers.stop.clone(), next_id.clone(), statement.clone());
        let mut ticker = drive.ticker(Op::InsertRow, CONNECTIONS, per_insert);
        workers.tasks.spawn(async move {
            let content = "x".repeat(PAYLOAD_BYTES);
            while !stop.is_cancelled() {
                pace(&mut ticker).await;
                let first = next_id.fetch_add(per_insert as u64, Ordering::Relaxed);
                let params = rows(first, per_insert, worker, &content);
                let mut tx = conn.start_transaction(TxOpts::default()).await?;
                tx.exec_drop(&statement, params).await?;
                tx.commit().await?;
                done.fetch_add(per_insert as u64, Ordering::Relaxed);
            }
            Ok(())
        });
    }
    let scope = CpuScope::ServersAndBench(scratch.mysql_processes.clone());
    let how = format!(
        "{CONNECTIONS} connections, {}, {per_insert} rows per INSERT and transaction, {PAYLOAD_BYTES} B content",
        drive.describe()
    );
    let measured = measure(Op::InsertRow, how, scope, secs, workers).await;
    let _ = pool.disconnect().await;
    measured
}

/// The save stage's INSERT of `rows` rows.
fn insert_statement(rows: usize) -> String {
    let row = format!("({})", vec!["?"; COLUMNS.len()].join(","));
    format!(
        "INSERT INTO messages ({}) VALUES {} ON DUPLICATE KEY UPDATE id = id",
        COLUMNS.join(", "),
        vec![row.as_str(); rows].join(",")
    )
}

/// The parameters of `n` rows with ids from `first`, sent by user `sender` to user `sender + 1`
/// (each row its own clientMsgId and seq, so none collides).
fn rows(first: u64, n: usize, sender: u64, content: &str) -> Params {
    let mut params = Vec::with_capacity(n * COLUMNS.len());
    for id in first..first + n as u64 {
        params.extend([
            Value::from(id),
            Value::from(sender),
            Value::from(sender + 1),
            Value::from(id),
            Value::from(id.to_string()),
            Value::from("TEXT"),
            Value::from(content),
        ]);
    }
    Params::Positional(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_has_a_placeholder_per_column_and_row() {
        let sql = insert_statement(2);
        let columns = "id, from_user_id, to_user_id, seq, client_msg_id, msg_type, content";
        let values = "(?,?,?,?,?,?,?),(?,?,?,?,?,?,?)";
        assert_eq!(sql, format!("INSERT INTO messages ({columns}) VALUES {values} ON DUPLICATE KEY UPDATE id = id"));
        let Params::Positional(values) = rows(1, ROWS_PER_INSERT, 7, "x") else { panic!("positional") };
        assert_eq!(values.len(), ROWS_PER_INSERT * COLUMNS.len());
    }
}
