//! Reading a run's rows back from MySQL, for [`crate::checker::check_rows`].
//!
//! The bench's only SQL: the run's rows by sender, and rows by id for the `ACK(saved)` ids that are
//! not among them (a row of someone else under a receipted id is a receipt without its row). `im_common::store::Store::all_ids` reads the whole table, which is fine in a
//! test database but not in a cluster database that keeps every earlier run's rows; a run's users are
//! a contiguous id block, so one indexed range scan on `uk_sender_client_msg (from_user_id, ...)`
//! fetches exactly this run's rows.

use std::ops::RangeInclusive;

use mysql_async::prelude::Queryable;

use crate::checker::DbRow;

/// The row check could not read the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("bad MySQL URL {url}: {message}")]
    Url { url: String, message: String },
    #[error("query failed: {0}")]
    Query(#[from] mysql_async::Error),
}

/// A row as read with its recipient and seq: (from, clientMsgId, id, to, seq).
type SeqRow = (u64, String, u64, u64, u64);

/// MySQL's error number for an unknown column.
const ER_BAD_FIELD_ERROR: u16 = 1054;

/// Every message row sent by a user in `senders`, with its recipient and `seq` (a table without the
/// seq column, from before issue 12, gives rows without it; a seq of 0 is no seq).
pub async fn rows_from(mysql_url: &str, senders: RangeInclusive<u64>) -> Result<Vec<DbRow>, DbError> {
    let opts = mysql_async::Opts::from_url(mysql_url)
        .map_err(|e| DbError::Url { url: mysql_url.to_owned(), message: e.to_string() })?;
    let mut conn = mysql_async::Conn::new(opts).await?;
    let range = (*senders.start(), *senders.end());
    let with_seq: Result<Vec<SeqRow>, _> = conn
        .exec(
            "SELECT from_user_id, client_msg_id, id, to_user_id, seq FROM messages \
             WHERE from_user_id BETWEEN ? AND ? ORDER BY id",
            range,
        )
        .await;
    let rows = match with_seq {
        Ok(rows) => rows
            .into_iter()
            .map(|(from, client_msg_id, id, to, seq)| DbRow {
                from,
                client_msg_id,
                id,
                to,
                seq: (seq > 0).then_some(seq),
            })
            .collect(),
        Err(mysql_async::Error::Server(e)) if e.code == ER_BAD_FIELD_ERROR => {
            let rows: Vec<(u64, String, u64, u64)> = conn
                .exec(
                    "SELECT from_user_id, client_msg_id, id, to_user_id FROM messages \
                     WHERE from_user_id BETWEEN ? AND ? ORDER BY id",
                    range,
                )
                .await?;
            rows.into_iter()
                .map(|(from, client_msg_id, id, to)| DbRow { from, client_msg_id, id, to, seq: None })
                .collect()
        }
        Err(e) => return Err(e.into()),
    };
    conn.disconnect().await?;
    Ok(rows)
}

/// Ids looked up per query by [`rows_by_id`].
const IDS_PER_QUERY: usize = 500;

/// The rows whose id is in `ids` (whoever sent them); usually `ids` is empty and nothing is asked.
pub async fn rows_by_id(mysql_url: &str, ids: &[u64]) -> Result<Vec<DbRow>, DbError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let opts = mysql_async::Opts::from_url(mysql_url)
        .map_err(|e| DbError::Url { url: mysql_url.to_owned(), message: e.to_string() })?;
    let mut conn = mysql_async::Conn::new(opts).await?;
    let mut out = Vec::new();
    for chunk in ids.chunks(IDS_PER_QUERY) {
        // Numbers only, so the list can be written into the statement.
        let list = chunk.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let rows: Vec<(u64, String, u64)> =
            conn.query(format!("SELECT from_user_id, client_msg_id, id FROM messages WHERE id IN ({list})")).await?;
        out.extend(rows.into_iter().map(|(from, client_msg_id, id)| DbRow::new(from, client_msg_id, id)));
    }
    conn.disconnect().await?;
    Ok(out)
}
