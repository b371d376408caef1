//! How long the save stage's current batch has been failing, and why: a wedged shard is never silent.
//!
//! The save stage retries a failed INSERT for as long as it takes — nothing accepted is dropped (SPEC
//! §3.1), and a database that is fixed (MySQL back up, a renamed table renamed back) drains. Retrying
//! alone hides the difference between "MySQL is restarting" and "the schema is wrong and nothing of
//! this shard will be saved until someone fixes it", so the failure is tracked as a state:
//!
//! - `im_worker_save_failing_seconds{shard}`: seconds since the current batch's first failed attempt,
//!   kept current while it waits to retry; 0 when saves succeed (set at 0 when the stage starts, so
//!   scrapes and rules see the series before anything fails). Alert `ImShardSaveWedged`.
//! - `im_worker_save_errors_total{shard,class}`: failed attempts by [`StoreError::class`]
//!   (`unavailable`: server or network; `statement`: the server refuses the statement itself).
//! - The log: one line when the batch starts failing or the reason changes (class and the server's
//!   error code), a reminder every [`REMIND_EVERY`] while it lasts, one when it is saved again — never
//!   one per retry.

use std::time::{Duration, Instant};

use metrics::Gauge;

use im_common::store::StoreError;

/// How often a failure that lasts is logged again.
pub const REMIND_EVERY: Duration = Duration::from_secs(30);

/// The classes a failed save can have (`row` errors never fail a batch: those rows are dead-lettered).
const RETRIED_CLASSES: [&str; 2] = ["unavailable", "statement"];

/// The failure state of one shard's save stage.
pub(crate) struct SaveHealth {
    shard: u16,
    failing_seconds: Gauge,
    failing: Option<Failing>,
}

struct Failing {
    since: Instant,
    attempts: u64,
    /// `(class, server error code)`: a change is logged at once.
    cause: (&'static str, Option<u16>),
    logged_at: Instant,
}

impl SaveHealth {
    /// Healthy; creates the shard's series at 0.
    pub(crate) fn new(shard: u16) -> SaveHealth {
        let label = shard.to_string();
        for class in RETRIED_CLASSES {
            metrics::counter!("im_worker_save_errors_total", "shard" => label.clone(), "class" => class).increment(0);
        }
        let failing_seconds = metrics::gauge!("im_worker_save_failing_seconds", "shard" => label);
        failing_seconds.set(0.0);
        SaveHealth { shard, failing_seconds, failing: None }
    }

    /// An attempt to save the current batch failed with `error`.
    pub(crate) fn failed(&mut self, error: &StoreError) {
        let class = error.class();
        metrics::counter!("im_worker_save_errors_total", "shard" => self.shard.to_string(), "class" => class)
            .increment(1);
        let cause = (class, error.code());
        let now = Instant::now();
        let news = match &mut self.failing {
            None => {
                self.failing = Some(Failing { since: now, attempts: 1, cause, logged_at: now });
                Some("save failing: the batch stays pending and is retried until it is saved")
            }
            Some(f) => {
                f.attempts += 1;
                if f.cause != cause {
                    f.cause = cause;
                    f.logged_at = now;
                    Some("save still failing, for another reason")
                } else if now.duration_since(f.logged_at) >= REMIND_EVERY {
                    f.logged_at = now;
                    Some("save still failing")
                } else {
                    None
                }
            }
        };
        if let Some(what) = news {
            self.log(error, what);
        }
        self.refresh();
    }

    /// The current batch was saved.
    pub(crate) fn saved(&mut self) {
        if let Some(f) = self.failing.take() {
            tracing::info!(
                shard = self.shard, failed_for = ?f.since.elapsed(), attempts = f.attempts,
                "save recovered: the batch is saved"
            );
            self.failing_seconds.set(0.0);
        }
    }

    /// Waits `pause` before the next attempt, keeping the gauge current (at most a second stale).
    pub(crate) async fn wait(&self, pause: Duration) {
        let until = tokio::time::Instant::now() + pause;
        loop {
            self.refresh();
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
    }

    fn refresh(&self) {
        if let Some(f) = &self.failing {
            self.failing_seconds.set(f.since.elapsed().as_secs_f64());
        }
    }

    fn log(&self, error: &StoreError, what: &str) {
        let Some(f) = &self.failing else { return };
        // The error carries the server's code and message (`ERROR 1146 (42S02): Table ... doesn't exist`).
        let (class, (failing_for, attempts)) = (f.cause.0, (f.since.elapsed(), f.attempts));
        if class == "statement" {
            // Nothing of this shard is saved until an operator fixes the database.
            tracing::error!(shard = self.shard, class, ?failing_for, attempts, %error, "{what}");
        } else {
            tracing::warn!(shard = self.shard, class, ?failing_for, attempts, %error, "{what}");
        }
    }
}

impl Drop for SaveHealth {
    /// The stage stopped (lease lost or shutdown): the batch is the next owner's, and so is its failure.
    fn drop(&mut self) {
        self.failing_seconds.set(0.0);
    }
}
