//! What travels inside Redis: stream entries and node-channel pushes, encoded with MessagePack.
//!
//! A stream entry has a single field [`MSG_FIELD`]: in `accepted`, one [`Accepted`] message; in
//! `to_save`, a [`Handed`] batch — everything one round of the deliver stage handed on, so the
//! stream costs an entry per batch, not per message. A node-channel message is
//! a [`PushBatch`]: every frame one publisher has for one gateway node in one batch, so a batch of N
//! messages costs one PUBLISH per node, not N.

use serde::{Deserialize, Serialize};

use crate::protocol::{FrameType, ServerFrame};

/// The field name of the MessagePack payload in stream entries.
pub const MSG_FIELD: &str = "m";

/// One chat message: what is pushed, stored and returned by history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// serverMsgId.
    pub id: u64,
    pub from: u64,
    pub to: u64,
    pub client_msg_id: String,
    pub msg_type: String,
    pub body: String,
    /// Position in the from→to direction (SPEC §3.10); 0 until the shard owner (or, on the
    /// baseline path, the save) assigns it.
    #[serde(default)]
    pub seq: u64,
}

impl ChatMessage {
    /// The `SINGLE_CHAT` push of this message to its recipient.
    pub fn push_frame(&self) -> ServerFrame {
        ServerFrame {
            client_msg_id: Some(self.client_msg_id.clone()),
            server_msg_id: Some(self.id),
            from: Some(self.from),
            to: Some(self.to),
            msg_type: Some(self.msg_type.clone()),
            body: Some(self.body.clone()),
            ts: Some(crate::ids::timestamp_ms(self.id)),
            seq: (self.seq > 0).then_some(self.seq),
            ..ServerFrame::bare(FrameType::SingleChat)
        }
    }
}

/// A stream entry: the message and where its sender is, so receipts can go back to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub msg: ChatMessage,
    pub origin: Origin,
    /// Full mode: the recipient's presence epoch (`Keys::presence`) when the deliver stage pushed the
    /// message. The save stage pushes it again after the commit if the epoch has changed since: a
    /// connection made in between synced from MySQL before this message was there.
    #[serde(default)]
    pub pushed_at_epoch: Option<u64>,
    /// Appended while its gateway believed Redis away: had the reply been lost, the gateway would
    /// have saved the message on the baseline path too (fail-open). The shard owner claims its path
    /// in MySQL before numbering it (`store::path_claims`). Left out of the encoding when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub path_claim: bool,
}

/// A `to_save` entry: one deliver batch, numbered and pushed, in stream order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    pub messages: Vec<Accepted>,
    /// `accepted` entries that did not decode, as they were: the save stage dead-letters them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undecodable: Vec<Vec<u8>>,
}

impl Handed {
    /// How many `accepted` entries the batch holds (what the `to_save` message count adds).
    pub fn len(&self) -> usize {
        self.messages.len() + self.undecodable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The gateway node and connection a message came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub node: u16,
    pub conn: u64,
}

/// One frame for one user on the receiving node. With `conn`, it goes to that connection if it is
/// still there, else to all of the user's connections on the node; without, to all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    pub user: u64,
    pub conn: Option<u64>,
    pub frame: ServerFrame,
}

/// The payload of one PUBLISH to a node channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushBatch {
    pub pushes: Vec<Push>,
}

/// A payload that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable record: {0}")]
pub struct DecodeError(#[from] rmp_serde::decode::Error);

/// MessagePack-encodes a record, as a map with field names: frames omit their empty fields, which
/// a positional array encoding cannot express, and named fields let old and new processes mix.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain structs into a Vec cannot fail.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// Decodes a MessagePack record.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AckType, ServerFrame};

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let m = ChatMessage {
            id: 99,
            from: 1,
            to: 2,
            client_msg_id: "c".into(),
            msg_type: "TEXT".into(),
            body: "héllo".into(),
            seq: 5,
        };
        let entry = Accepted {
            msg: m.clone(),
            origin: Origin { node: 3, conn: 4 },
            pushed_at_epoch: Some(2),
            path_claim: true,
        };
        assert_eq!(decode::<Accepted>(&encode(&entry)).unwrap(), entry);
        let b = PushBatch {
            pushes: vec![
                Push { user: 2, conn: None, frame: m.push_frame() },
                Push { user: 1, conn: Some(4), frame: ServerFrame::ack(AckType::Saved, "c", 99) },
            ],
        };
        assert_eq!(decode::<PushBatch>(&encode(&b)).unwrap(), b);
        let handed = Handed { messages: vec![entry.clone(), entry], undecodable: vec![b"\xc1garbage".to_vec()] };
        assert_eq!((decode::<Handed>(&encode(&handed)).unwrap(), handed.len()), (handed, 3));
        assert!(decode::<Accepted>(b"\xc1garbage").is_err());
    }
}
