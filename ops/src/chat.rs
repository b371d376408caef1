//! `ops chat`: a tiny client for trying a cluster by hand, with no WebSocket tool to install. It
//! connects as a user (signing its own token with the cluster's secret), optionally sends one message
//! and prints every frame that comes back as one JSON line — the receipts, then whatever else
//! arrives (pushes, the connect-time sync) while it listens.

use std::time::Duration;

use tokio::time::Instant;

use im_harness::cluster::ClusterState;
use im_harness::ws::{Client, ClientError};

/// Listening "until interrupted" is listening this long (a WebSocket stays open much shorter anyway).
const UNTIL_INTERRUPTED: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a chat did not get its answer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the cluster has no gateway {0}")]
    NoSuchGateway(usize),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no ACK(saved) or ERROR for {0} within {1:?}")]
    NoAnswer(String, Duration),
    #[error("the gateway answered ERROR {0}")]
    Refused(String),
}

/// One chat session.
pub struct Chat {
    pub user: u64,
    /// Index into the cluster's gateways.
    pub gateway: usize,
    /// Recipient and text of the message to send, if any.
    pub message: Option<(u64, String)>,
    /// Longest wait for the message's final receipt.
    pub timeout: Duration,
    /// How long to keep printing incoming frames afterwards (`None`: until interrupted).
    pub listen: Option<Duration>,
}

impl Chat {
    /// Connects, sends, prints the receipts (and listens), each frame as a JSON line on stdout.
    pub async fn run(&self, state: &ClusterState) -> Result<(), ChatError> {
        let gateway = state.gateways.get(self.gateway).ok_or(ChatError::NoSuchGateway(self.gateway + 1))?;
        let mut client = Client::connect(&gateway.ws_url, &state.jwt_secret, self.user).await?;
        if let Some((to, text)) = &self.message {
            let cmid = format!("ops-chat-{}", im_common::ids::now_ms());
            client.chat(*to, &cmid, text).await?;
            self.print_until_answered(&mut client, &cmid).await?;
        }
        let listen = match (self.listen, &self.message) {
            (Some(wait), _) => wait,
            (None, None) => UNTIL_INTERRUPTED,
            (None, Some(_)) => Duration::ZERO,
        };
        let deadline = Instant::now() + listen;
        while let Some(frame) = client.next_within(deadline.saturating_duration_since(Instant::now())).await {
            println!("{frame}");
        }
        Ok(())
    }

    /// Prints frames until the message `cmid` has its `ACK(saved)` (or an `ERROR`).
    async fn print_until_answered(&self, client: &mut Client, cmid: &str) -> Result<(), ChatError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = client.next_within(left).await else {
                return Err(ChatError::NoAnswer(cmid.to_owned(), self.timeout));
            };
            println!("{frame}");
            if frame["clientMsgId"] != cmid {
                continue;
            }
            match (frame["type"].as_str(), frame["ackType"].as_str()) {
                (Some("ACK"), Some("saved")) => return Ok(()),
                (Some("ERROR"), _) => {
                    return Err(ChatError::Refused(frame["reason"].as_str().unwrap_or("?").to_owned()));
                }
                _ => {}
            }
        }
    }
}
