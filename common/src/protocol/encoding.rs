//! How frames are written on the wire: JSON in text frames (the default), or the same envelope in
//! MessagePack in binary frames, negotiated per connection by WebSocket subprotocol (SPEC §4).
//!
//! The envelope is the same in both: the same field names, ids as decimal strings, null fields
//! omitted. A client frame's opcode says how it is encoded (text: JSON, binary: MessagePack), so
//! either is read on any connection; the server writes in the connection's negotiated encoding.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Reason, ServerFrame};

/// The subprotocol that selects MessagePack.
pub const MSGPACK_SUBPROTOCOL: &str = "msgpack";
/// The subprotocol that selects JSON explicitly (the same as offering none).
pub const JSON_SUBPROTOCOL: &str = "json";

/// A connection's wire encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// One JSON object per text frame.
    #[default]
    Json,
    /// One MessagePack map per binary frame.
    MsgPack,
}

impl Encoding {
    /// The encoding a client asked for in its `Sec-WebSocket-Protocol` header (a comma-separated
    /// list in order of preference): the first one this server speaks, with the name to answer.
    /// `None` when it offered none of ours (or no header): JSON, and no subprotocol in the answer.
    pub fn negotiate(offered: &str) -> Option<(Encoding, &'static str)> {
        offered.split(',').map(str::trim).find_map(|name| match name {
            MSGPACK_SUBPROTOCOL => Some((Encoding::MsgPack, MSGPACK_SUBPROTOCOL)),
            JSON_SUBPROTOCOL => Some((Encoding::Json, JSON_SUBPROTOCOL)),
            _ => None,
        })
    }

    /// The encoding of a client frame, by its opcode.
    pub fn of_frame(binary: bool) -> Encoding {
        if binary {
            Encoding::MsgPack
        } else {
            Encoding::Json
        }
    }

    /// Whether frames in this encoding go in binary WebSocket frames.
    pub fn is_binary(self) -> bool {
        self == Encoding::MsgPack
    }

    /// The reason a frame that does not decode is refused with.
    pub fn undecodable(self) -> Reason {
        match self {
            Encoding::Json => Reason::BadJson,
            Encoding::MsgPack => Reason::BadMsgpack,
        }
    }

    /// Reads a client frame; `None` if the bytes are not one value of this encoding.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Option<T> {
        match self {
            Encoding::Json => serde_json::from_slice(bytes).ok(),
            Encoding::MsgPack => rmp_serde::from_slice(bytes).ok(),
        }
    }

    /// Writes a frame (the server's, or a client's in tools and tests).
    pub fn encode<T: Serialize + ?Sized>(self, frame: &T) -> Bytes {
        self.to_vec(frame).into()
    }

    /// [`Encoding::encode`] into a `Vec`.
    pub fn to_vec<T: Serialize + ?Sized>(self, frame: &T) -> Vec<u8> {
        // Serializing frames (strings, integers, enums, maps with string keys) cannot fail.
        match self {
            Encoding::Json => serde_json::to_vec(frame).unwrap_or_default(),
            Encoding::MsgPack => rmp_serde::to_vec_named(frame).unwrap_or_default(),
        }
    }
}

/// One frame for many connections: written at most once per encoding, when first asked for.
pub struct Encoded<'a> {
    frame: &'a ServerFrame,
    json: Option<Bytes>,
    msgpack: Option<Bytes>,
}

impl<'a> Encoded<'a> {
    pub fn new(frame: &'a ServerFrame) -> Self {
        Encoded { frame, json: None, msgpack: None }
    }

    /// The frame in `encoding` (a cheap clone of the bytes after the first call).
    pub fn get(&mut self, encoding: Encoding) -> Bytes {
        let slot = match encoding {
            Encoding::Json => &mut self.json,
            Encoding::MsgPack => &mut self.msgpack,
        };
        slot.get_or_insert_with(|| encoding.encode(self.frame)).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AckType, FrameType};

    #[test]
    fn the_first_offered_subprotocol_we_speak_is_chosen() {
        assert_eq!(Encoding::negotiate("msgpack"), Some((Encoding::MsgPack, "msgpack")));
        assert_eq!(Encoding::negotiate("v2.chat, json ,msgpack"), Some((Encoding::Json, "json")));
        assert_eq!(Encoding::negotiate("x, msgpack"), Some((Encoding::MsgPack, "msgpack")));
        assert_eq!(Encoding::negotiate("MessagePack"), None);
        assert_eq!(Encoding::negotiate(""), None);
    }

    #[test]
    fn a_frame_in_messagepack_is_the_json_envelope_field_for_field() {
        let frame = ServerFrame::ack(AckType::Saved, "c1", 384063290302533632);
        let mut encoded = Encoded::new(&frame);
        let packed = encoded.get(Encoding::MsgPack);
        let as_value: serde_json::Value = rmp_serde::from_slice(&packed).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&encoded.get(Encoding::Json)).unwrap();
        assert_eq!(as_value, json, "the same keys, ids as strings, nulls omitted");
        assert_eq!(as_value["serverMsgId"], "384063290302533632");
        assert_eq!(as_value["type"], FrameType::Ack.as_str());
        assert!(packed.len() < encoded.get(Encoding::Json).len());
        assert_eq!(encoded.get(Encoding::MsgPack).as_ptr(), packed.as_ptr(), "encoded once");
    }
}
