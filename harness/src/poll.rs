//! Waiting for a condition: check it, pause along the workspace's one backoff curve
//! ([`im_common::backoff::Backoff`]), check again, until it holds or a time limit passes.
//!
//! Every "wait until ready / gone / drained / at least N" loop of the harness, `ops`, `bench` and the
//! end-to-end tests goes through here, so none of them spins and none waits a fixed time it hopes is
//! long enough. Pauses start short (a process that is almost ready answers within milliseconds) and
//! grow to a cap (a slow one is not hammered).

use std::future::Future;
use std::time::Duration;

use im_common::backoff::Backoff;
use tokio::time::Instant;

/// The first pause between two checks.
pub const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between two checks.
pub const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Runs `check` until it returns `Some`, or `limit` has passed (then `None`). It is checked at least
/// once, and once more at the limit.
pub async fn until<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    let mut backoff = Backoff::new(FIRST_PAUSE, MAX_PAUSE);
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(backoff.next_pause().min(deadline - now)).await;
    }
}

/// [`until`] for a plain condition: whether it held within `limit`.
pub async fn until_true(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    until(limit, || std::future::ready(check().then_some(()))).await.is_some()
}

/// [`until`] for an asynchronous condition: whether it held within `limit`.
pub async fn until_true_async<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until(limit, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
    .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_condition_that_comes_true_ends_the_wait_and_one_that_never_does_times_out() {
        let started = Instant::now();
        let mut calls = 0;
        let got = until(Duration::from_secs(5), || {
            calls += 1;
            std::future::ready((calls == 3).then_some(calls))
        })
        .await;
        assert_eq!(got, Some(3));
        assert!(started.elapsed() < Duration::from_secs(1));
        let started = Instant::now();
        assert!(!until_true(Duration::from_millis(50), || false).await);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
