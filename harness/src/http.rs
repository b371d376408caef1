//! The one HTTP client of the harness: `GET` over loopback for readiness checks, metrics scrapes,
//! the history API, the dashboard and Prometheus's API.
//!
//! hyper's HTTP/1.1 client connection, one request per connection: it speaks the protocol properly,
//! so chunked replies (Prometheus's large API answers) and `Content-Length` bodies are decoded alike.
//! Bounded in time end to end, so a process that accepts and never answers cannot hang a caller.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Longest wait for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the whole answer once connected.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a `GET` got no answer (an answer with any status is not an error).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not an http:// URL: {0}")]
    BadUrl(String),
    #[error("connect {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{0}: no answer in time")]
    Timeout(String),
    #[error("{url}: {source}")]
    Protocol { url: String, source: hyper::Error },
    #[error("{url}: {source}")]
    Request { url: String, source: hyper::http::Error },
}

/// `http://host:port/path?query` split into (`host:port`, `/path?query`).
fn split_url(url: &str) -> Option<(&str, String)> {
    let rest = url.strip_prefix("http://")?;
    match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('?') => Some((&rest[..i], format!("/{}", &rest[i..]))),
        Some(i) => Some((&rest[..i], rest[i..].to_owned())),
        None => Some((rest, "/".to_owned())),
    }
}

/// `GET url`: the status and the body as text (lossily decoded).
pub async fn get(url: &str) -> Result<(u16, String), HttpError> {
    let (addr, path) = split_url(url).ok_or_else(|| HttpError::BadUrl(url.to_owned()))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| HttpError::Timeout(url.to_owned()))?
        .map_err(|source| HttpError::Connect { addr: addr.to_owned(), source })?;
    tokio::time::timeout(RESPONSE_TIMEOUT, exchange(tcp, url, addr, &path))
        .await
        .map_err(|_| HttpError::Timeout(url.to_owned()))?
}

async fn exchange(tcp: TcpStream, url: &str, host: &str, path: &str) -> Result<(u16, String), HttpError> {
    let protocol = |source| HttpError::Protocol { url: url.to_owned(), source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(protocol)?;
    // The connection task ends when the answer is read (or the peer goes away).
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|source| HttpError::Request { url: url.to_owned(), source })?;
    let response = sender.send_request(request).await.map_err(protocol)?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(protocol)?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot server that answers the first request with `reply` verbatim.
    async fn serve_once(reply: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            stream.write_all(reply.as_bytes()).await.unwrap();
        });
        format!("http://{addr}/x")
    }

    #[tokio::test]
    async fn chunked_and_sized_replies_are_decoded() {
        let chunked = serve_once(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(get(&chunked).await.unwrap(), (200, "hello world".to_owned()));
        let sized = serve_once("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy").await;
        assert_eq!(get(&sized).await.unwrap(), (503, "busy".to_owned()));
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(matches!(get(&format!("http://127.0.0.1:{port}/")).await, Err(HttpError::Connect { .. })));
        assert!(matches!(get("ftp://x/").await, Err(HttpError::BadUrl(_))));
    }

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(split_url("http://127.0.0.1:9/metrics"), Some(("127.0.0.1:9", "/metrics".to_owned())));
        assert_eq!(split_url("http://h:1?x=1"), Some(("h:1", "/?x=1".to_owned())));
        assert_eq!(split_url("http://h:1"), Some(("h:1", "/".to_owned())));
    }
}
