//! Whether a Redis or a MySQL answers at a URL, and a free port for a server of our own.
//!
//! The configured servers are used when they answer; otherwise private ones are started (see the
//! module above). A probe is bounded in time, so a port where nothing listens — or something that
//! accepts and never answers — costs about a second, not a hang.

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

use super::ServerError;

use tracing::warn;

/// How long a Redis gets to answer PING before it counts as unreachable.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a MySQL/MariaDB gets to accept a connection before it counts as unreachable.
pub(super) const MYSQL_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Where a port is guessed when the kernel cannot be asked (no loopback interface).
const GUESSED_PORTS: std::ops::Range<u16> = 20_000..60_000;

/// True when a Redis answers PING at `url` within about a second.
pub async fn redis_reachable(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    // A Redis still replaying its AOF answers PING with LOADING, which is an error here: it is not
    // ready to serve yet.
    matches!(tokio::time::timeout(REDIS_PROBE_TIMEOUT, ping).await, Ok(Ok(pong)) if pong == "PONG")
}

/// True when a MySQL/MariaDB accepts a connection at `url` (`mysql://user:pass@host:port/db`) within
/// about two seconds. The database in the URL is ignored, so a server without that database yet still
/// counts as reachable (migrations create it).
pub async fn mysql_reachable(url: &str) -> bool {
    let Ok(opts) = mysql_async::Opts::from_url(url) else {
        return false;
    };
    // prefer_socket(false): the question is whether TCP works, not whether a local socket does.
    let opts = mysql_async::OptsBuilder::from_opts(opts).db_name(None::<String>).prefer_socket(false);
    let connect = async {
        let conn = mysql_async::Conn::new(opts).await?;
        conn.disconnect().await
    };
    matches!(tokio::time::timeout(MYSQL_PROBE_TIMEOUT, connect).await, Ok(Ok(())))
}

/// The server part of a MySQL URL with a trailing `/` and no database or query, so callers append
/// their database name: `mysql://u:p@h:3306/im?x=1` → `mysql://u:p@h:3306/`.
pub fn mysql_server_url(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..].find(['/', '?', '#']).map_or(url.len(), |i| authority_start + i);
    format!("{}/", &url[..authority_end])
}

/// A free TCP port on 127.0.0.1, found by binding port 0 and letting the listener go. Another
/// process may take it before it is used; a start on it then fails with a clear error.
pub fn free_port() -> u16 {
    match TcpListener::bind(("127.0.0.1", 0)).and_then(|listener| listener.local_addr()) {
        Ok(addr) => addr.port(),
        Err(error) => {
            // Only happens without a loopback interface; a random high port is as good a guess as
            // any, and starting a server on it reports the real problem.
            let port = rand::random_range(GUESSED_PORTS);
            warn!(%error, port, "could not ask the kernel for a free port; guessing");
            port
        }
    }
}

/// Most ports a private server is tried on (see [`with_port_retries`]).
const PORT_TRIES: usize = 5;

/// Runs `start` on `port`, and again on a fresh free port when that one was taken meanwhile:
/// between [`free_port`] finding a port free and a server binding it, anything may take it — an
/// outgoing connection's ephemeral port, a server of a test running beside. Up to [`PORT_TRIES`]
/// ports; any other error ends the tries at once.
pub async fn with_port_retries<T, Fut>(port: u16, mut start: impl FnMut(u16) -> Fut) -> Result<T, ServerError>
where
    Fut: Future<Output = Result<T, ServerError>>,
{
    let mut port = port;
    for _ in 1..PORT_TRIES {
        match start(port).await {
            Err(ServerError::PortInUse { port: taken, .. }) => {
                tracing::debug!(port = taken, "the port was taken meanwhile; trying another");
                port = free_port();
            }
            done => return done,
        }
    }
    start(port).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_server_url_drops_database_and_query_but_keeps_credentials() {
        assert_eq!(mysql_server_url("mysql://root@127.0.0.1:3306/whatever"), "mysql://root@127.0.0.1:3306/");
        assert_eq!(mysql_server_url("mysql://u:p%2Fw@db.local:3307/im?pool_max=9"), "mysql://u:p%2Fw@db.local:3307/");
        assert_eq!(mysql_server_url("mysql://root@127.0.0.1:3306"), "mysql://root@127.0.0.1:3306/");
        assert_eq!(mysql_server_url("mysql://root@127.0.0.1:3306/"), "mysql://root@127.0.0.1:3306/");
    }

    #[tokio::test]
    async fn a_start_on_a_port_taken_meanwhile_is_tried_on_another() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let busy = taken.local_addr().unwrap().port();
        let mut tried = Vec::new();
        let bound = with_port_retries(busy, |port| {
            tried.push(port);
            std::future::ready(
                TcpListener::bind(("127.0.0.1", port)).map_err(|source| ServerError::PortInUse { port, source }),
            )
        })
        .await
        .unwrap();
        assert_eq!((tried.len(), tried[0]), (2, busy), "{tried:?}");
        assert_eq!(bound.local_addr().unwrap().port(), tried[1]);
        let refused: Result<(), _> =
            with_port_retries(busy, |_| std::future::ready(Err(ServerError::InvalidAppendfsync("x".into())))).await;
        assert!(matches!(refused, Err(ServerError::InvalidAppendfsync(_))), "other errors are not retried");
    }

    #[tokio::test]
    async fn nothing_answers_on_a_free_port() {
        let port = free_port();
        assert!(!redis_reachable(&format!("redis://127.0.0.1:{port}")).await);
        assert!(!mysql_reachable(&format!("mysql://root@127.0.0.1:{port}/im")).await);
    }
}
