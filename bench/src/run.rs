//! A whole `bench run`: offer the load ([`crate::load`]), read the run's rows back from MySQL and
//! check them against the receipts ([`crate::checker`]), and assemble the [`RunReport`].
//!
//! Kept apart from the load itself so the report depends on the load's result and nothing depends
//! back: the load knows nothing of reports or databases.

use crate::checker::{self, RecipientVerdict, RowVerdict};
use crate::load::{run_load, LoadResult};
use crate::report::RunReport;
use crate::spec::{LoadSpec, Target};
use crate::{db, BenchError};

/// Runs the load, checks the rows in MySQL (when the target names a database), and reports.
pub async fn run(target: &Target, spec: &LoadSpec) -> Result<RunReport, BenchError> {
    let mut result = run_load(target, spec).await?;
    let rows = match &target.mysql_url {
        Some(url) => {
            let (rows, recipients) = check_db_all(url, &result).await?;
            result.recipients = recipients;
            Some(rows)
        }
        None => None,
    };
    Ok(RunReport::new(&result, rows))
}

/// Reads the run's rows from MySQL (and, by id, any row an `ACK(saved)` names that is not among
/// them) and checks them against the receipts and pushes.
pub async fn check_db(mysql_url: &str, result: &LoadResult) -> Result<RowVerdict, BenchError> {
    Ok(check_db_all(mysql_url, result).await?.0)
}

/// [`check_db`], and the per-device recipient check judged with the rows' seqs (the first and last
/// seq of every direction, seq gaps and reuse in the rows).
pub async fn check_db_all(mysql_url: &str, result: &LoadResult) -> Result<(RowVerdict, RecipientVerdict), BenchError> {
    let rows = db::rows_from(mysql_url, result.user_range()).await?;
    let strays = db::rows_by_id(mysql_url, &checker::saved_ids_without_row(&result.senders, &rows)).await?;
    let verdict = checker::check_rows(&result.senders, &result.receivers, &rows, &strays);
    let recipients = checker::check_recipients(&result.senders, &result.receivers, Some(&rows), result.spec.ack_read);
    Ok((verdict, recipients))
}
