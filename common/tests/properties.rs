//! Property tests of the pure parts of `im-common`: shard hashing, message ids, the wire envelope, the
//! stream records and the config loader.
//!
//! Inputs are generated to be hostile — quotes, backslashes, control characters, unicode, SQL-looking
//! text, out-of-range numbers — and the oracles are the ones the fuzz targets use
//! (`common/fuzz/src/lib.rs`, included below), so what the fuzzers check at length CI checks on every
//! run. Case counts keep the whole file to a few seconds in a debug build.

#[path = "../fuzz/src/lib.rs"]
mod oracles;

use std::collections::{BTreeSet, HashSet};

use im_common::config::Config;
use im_common::ids::{self, IdGenerator, MAX_NODES};
use im_common::protocol::{
    parse_request, AckType, Encoding, FrameLimits, FrameType, Reason, Request, SendRequest, ServerFrame,
    MAX_CLIENT_MSG_ID_LEN,
};
use im_common::record::{self, Accepted, ChatMessage, Origin, Push, PushBatch};
use im_common::shard::{fmix64, fnv1a64, shard_of};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Value;

/// `n` cases per property. A failure is not written to a `.proptest-regressions` file: the minimal
/// input proptest prints becomes a named regression test instead.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------- hostile text

/// Text that has broken JSON encoders, SQL layers and log lines elsewhere.
const SQL_AND_FRIENDS: [&str; 10] = [
    "'; DROP TABLE messages; --",
    "\" OR \"1\"=\"1",
    "Robert'); DROP TABLE students;--",
    "1; DELETE FROM messages WHERE 1=1",
    "\\'; SELECT SLEEP(10); -- ",
    "%' UNION SELECT id, body FROM messages --",
    "{\"type\":\"ACK\",\"ackType\":\"read\"}",
    "</script><script>alert(1)</script>",
    "${jndi:ldap://x/a}",
    "\\u0000\\\"",
];

fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        3 => prop::char::range(' ', '~'),
        3 => select(vec![
            '"', '\\', '\'', '/', ';', '\0', '\n', '\r', '\t', '\u{7}', '\u{1b}', '\u{7f}', '\u{85}', '\u{a0}',
            '\u{200b}', '\u{202e}', '\u{2028}', '\u{feff}', '\u{fffd}', '\u{10ffff}', 'é', '中', '😀',
        ]),
    ]
}

/// Up to `max_chars` characters of hostile text (possibly empty).
fn hostile_text(max_chars: usize) -> impl Strategy<Value = String> {
    let sql = select(SQL_AND_FRIENDS.to_vec());
    prop_oneof![
        3 => vec(hostile_char(), 0..=max_chars).prop_map(String::from_iter),
        1 => (sql, vec(hostile_char(), 0..=4)).prop_map(move |(s, tail)| {
            s.chars().chain(tail).take(max_chars).collect()
        }),
    ]
}

/// Non-empty hostile text of at most `max_bytes` bytes (cut at a character boundary).
fn hostile_text_bytes(max_bytes: usize) -> impl Strategy<Value = String> {
    hostile_text(max_bytes).prop_map(move |s| truncate_bytes(&s, max_bytes)).prop_filter("non-empty", |s| !s.is_empty())
}

fn truncate_bytes(s: &str, max_bytes: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    out
}

/// A JSON string literal with every character written as a `\uXXXX` escape (surrogate pairs above the
/// BMP): the decoder's other path for the same text.
fn json_string_all_escaped(s: &str) -> String {
    let mut out = String::from("\"");
    let mut units = [0u16; 2];
    for c in s.chars() {
        for unit in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{unit:04x}"));
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------- shard function

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn shard_is_always_below_the_shard_count(uid in any::<u64>(), shards in 1u16..=u16::MAX) {
        prop_assert!(shard_of(uid, shards) < shards);
    }

    #[test]
    fn shard_is_stable_and_is_fnv1a_of_the_le_bytes(uid in any::<u64>(), shards in 1u16..=1024) {
        let first = shard_of(uid, shards);
        prop_assert_eq!(first, shard_of(uid, shards));
        prop_assert_eq!(u64::from(first), fmix64(fnv1a64(&uid.to_le_bytes())) % u64::from(shards));
    }

    #[test]
    fn one_shard_owns_everyone_and_zero_shards_means_one(uid in any::<u64>()) {
        prop_assert_eq!(shard_of(uid, 1), 0);
        prop_assert_eq!(shard_of(uid, 0), 0);
    }
}

proptest! {
    #![proptest_config(cases(24))]

    /// 2000 users per shard with unrelated ids: every shard within ±15 % of its fair share (the
    /// binomial spread is about ±2 %, so only a real skew fails).
    #[test]
    fn unrelated_ids_spread_evenly_over_any_shard_count(seed in any::<u64>(), shards in 2u16..=64) {
        let counts = shard_counts((0..2000 * u64::from(shards)).map(|i| splitmix64(seed.wrapping_add(i))), shards);
        prop_assert!(worst_deviation(&counts) <= 0.15, "{:?}", counts);
    }

    /// Consecutive ids (how user ids are usually handed out) and strided ids (even ids, multiples of
    /// 256): the finalizer makes them spread like unrelated ones. FNV-1a alone failed this: its low
    /// bits follow the low bits of each byte, so even ids of one block all went to one of 2 shards.
    #[test]
    fn consecutive_and_strided_ids_spread_evenly(start in any::<u64>(), stride in prop::sample::select(vec![1u64, 2, 256]), shards in 2u16..=64) {
        let counts = shard_counts((0..2000 * u64::from(shards)).map(|i| start.wrapping_add(i * stride)), shards);
        prop_assert!(worst_deviation(&counts) <= 0.15, "{:?}", counts);
    }
}

/// Users per shard.
fn shard_counts(uids: impl Iterator<Item = u64>, shards: u16) -> Vec<u32> {
    let mut counts = vec![0u32; usize::from(shards)];
    for uid in uids {
        counts[usize::from(shard_of(uid, shards))] += 1;
    }
    counts
}

/// How far the fullest or emptiest shard is from the mean, as a fraction of it.
fn worst_deviation(counts: &[u32]) -> f64 {
    let mean = counts.iter().map(|&c| f64::from(c)).sum::<f64>() / counts.len() as f64;
    counts.iter().map(|&c| (f64::from(c) - mean).abs() / mean).fold(0.0, f64::max)
}

/// SplitMix64: an id source unrelated to FNV, for "users with unrelated ids".
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------- id generator

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn ids_strictly_increase_and_carry_node_and_time(node in 0..MAX_NODES, count in 1usize..20_000) {
        let generator = IdGenerator::new(node);
        let before = ids::now_ms() as i64;
        let minted: Vec<u64> = (0..count).map(|_| generator.next_id()).collect();
        let after = ids::now_ms() as i64;
        prop_assert!(minted.windows(2).all(|w| w[0] < w[1]), "ids of one generator must increase");
        // A sequence that overflows borrows the next millisecond, so ids may run ahead of the clock
        // by one millisecond per 4096 ids.
        let lead = (count / 4096) as i64 + 1;
        for id in minted {
            prop_assert_eq!(ids::node_of(id), node);
            let ts = ids::timestamp_ms(id);
            prop_assert!(ts >= before && ts <= after + lead, "ts {} outside {}..={}", ts, before, after + lead);
        }
    }

    #[test]
    fn generators_with_distinct_nodes_never_collide(
        nodes in prop::collection::btree_set(0..MAX_NODES, 2..6),
        per_node in 1usize..4000,
    ) {
        let generators: Vec<IdGenerator> = nodes.iter().map(|&n| IdGenerator::new(n)).collect();
        let mut seen = HashSet::with_capacity(per_node * generators.len());
        for _ in 0..per_node {
            for generator in &generators {
                let id = generator.next_id();
                prop_assert!(seen.insert(id), "duplicate id {}", id);
            }
        }
        let owners: BTreeSet<u16> = seen.iter().map(|&id| ids::node_of(id)).collect();
        prop_assert_eq!(owners, nodes);
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// For every id of the next ~69 years: `min_id_at` brackets it by its own millisecond.
    #[test]
    fn min_id_at_brackets_every_id(id in 0u64..(1 << 63)) {
        let ts = ids::timestamp_ms(id) as u64;
        prop_assert!(ids::min_id_at(ts) <= id && id < ids::min_id_at(ts + 1));
    }
}

// ---------------------------------------------------------------- envelope

fn frame_type() -> impl Strategy<Value = FrameType> {
    select(vec![
        FrameType::SingleChat,
        FrameType::Ack,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Auth,
        FrameType::AuthOk,
        FrameType::AuthFail,
        FrameType::Error,
    ])
}

fn ack_type() -> impl Strategy<Value = AckType> {
    select(vec![AckType::Accepted, AckType::Saved, AckType::Delivered, AckType::Read])
}

/// Ids at the edges and anywhere between.
fn id() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), select(vec![0, 1, 9, 10, u64::from(u32::MAX), (1 << 53) + 1, u64::MAX])]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let text = || proptest::option::of(hostile_text(24));
    (
        frame_type(),
        text(),
        proptest::option::of(id()),
        proptest::option::of(id()),
        proptest::option::of(id()),
        proptest::option::of(ack_type()),
        text(),
        text(),
        proptest::option::of(any::<i64>()),
        proptest::option::of(select(Reason::ALL.to_vec())),
        proptest::option::of(id()),
        proptest::option::of(id()),
    )
        .prop_map(
            |(kind, client_msg_id, server_msg_id, from, to, ack_type, msg_type, body, ts, reason, seq, peer)| {
                ServerFrame {
                    kind,
                    client_msg_id,
                    server_msg_id,
                    from,
                    to,
                    ack_type,
                    msg_type,
                    body,
                    ts,
                    reason,
                    seq,
                    peer,
                }
            },
        )
}

/// How a client may write an id: a JSON number or a decimal string, possibly zero-padded.
#[derive(Debug, Clone, Copy)]
enum IdForm {
    Number,
    Text,
    ZeroPadded,
}

fn id_form() -> impl Strategy<Value = IdForm> {
    select(vec![IdForm::Number, IdForm::Text, IdForm::ZeroPadded])
}

fn write_id(id: u64, form: IdForm) -> Value {
    match form {
        IdForm::Number => Value::from(id),
        IdForm::Text => Value::String(id.to_string()),
        IdForm::ZeroPadded => Value::String(format!("000{id}")),
    }
}

/// A valid `SINGLE_CHAT` as a client could write it, and the request it must parse to.
#[derive(Debug, Clone)]
struct ValidSend {
    uid: u64,
    limits: FrameLimits,
    /// `(key, value)` in the order they are written.
    fields: Vec<(String, Value)>,
    expected: SendRequest,
}

fn valid_send() -> impl Strategy<Value = ValidSend> {
    let body = (1usize..=200).prop_flat_map(|max_body_chars| {
        let body = vec(hostile_char(), 1..=max_body_chars).prop_map(String::from_iter);
        (Just(FrameLimits { max_body_chars }), body)
    });
    let client_msg_id = prop_oneof![
        3 => hostile_text_bytes(MAX_CLIENT_MSG_ID_LEN).prop_map(|s| (Value::String(s.clone()), s)),
        1 => any::<u64>().prop_map(|n| (Value::from(n), n.to_string())),
    ];
    // `from` may be absent, null, or the sender's own id in either form.
    let from = prop_oneof![Just(None), Just(Some(None)), id_form().prop_map(|f| Some(Some(f)))];
    let extra_key = "[a-zA-Z_]{1,12}".prop_filter("not a frame field", |k| !CLIENT_FIELDS.contains(&k.as_str()));
    (
        1u64..,
        1u64..,
        id_form(),
        from,
        client_msg_id,
        body,
        proptest::option::of(hostile_text(20)),
        proptest::option::of((extra_key, hostile_text(12))),
    )
        .prop_filter("sending to self is refused", |(uid, to, ..)| uid != to)
        .prop_flat_map(|(uid, to, to_form, from, (cmid_value, cmid), (limits, body), msg_type, extra)| {
            let mut fields = vec![
                ("type".to_owned(), Value::from("SINGLE_CHAT")),
                ("clientMsgId".to_owned(), cmid_value),
                ("to".to_owned(), write_id(to, to_form)),
                ("body".to_owned(), Value::String(body.clone())),
            ];
            match from {
                None => {}
                Some(None) => fields.push(("from".to_owned(), Value::Null)),
                Some(Some(form)) => fields.push(("from".to_owned(), write_id(uid, form))),
            }
            if let Some(t) = &msg_type {
                fields.push(("msgType".to_owned(), Value::String(t.clone())));
            }
            if let Some((key, value)) = extra {
                fields.push((key, Value::String(value)));
            }
            let kept_type = msg_type.filter(|t| !t.is_empty() && t.len() <= 16).unwrap_or_else(|| "TEXT".to_owned());
            let expected = SendRequest { to, client_msg_id: cmid, msg_type: kept_type, body };
            Just(fields).prop_shuffle().prop_map(move |fields| ValidSend {
                uid,
                limits,
                fields,
                expected: expected.clone(),
            })
        })
}

/// The fields `ClientFrame` knows (a duplicate of one is a JSON error, not an ignored extra).
const CLIENT_FIELDS: [&str; 9] =
    ["type", "clientMsgId", "serverMsgId", "from", "to", "ackType", "msgType", "body", "token"];

/// Writes the object with serde_json's escaping, or with every string character `\u`-escaped.
fn write_object(fields: &[(String, Value)], escape_everything: bool) -> String {
    let write_value = |v: &Value| match v {
        Value::String(s) if escape_everything => json_string_all_escaped(s),
        other => other.to_string(),
    };
    let members: Vec<String> =
        fields.iter().map(|(k, v)| format!("{}:{}", write_value(&Value::String(k.clone())), write_value(v))).collect();
    format!("{{{}}}", members.join(","))
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn server_frames_emit_decimal_string_ids_and_round_trip(frame in server_frame()) {
        oracles::check_server_frame(&frame);
    }

    #[test]
    fn valid_single_chat_parses_to_exactly_its_fields(send in valid_send(), escape_everything in any::<bool>()) {
        let text = write_object(&send.fields, escape_everything);
        let parsed = parse_request(text.as_bytes(), Encoding::Json, send.uid, send.limits);
        prop_assert_eq!(&parsed, &Ok(Request::Send(send.expected.clone())), "frame: {}", text);
        oracles::check_send(&send.expected, send.uid, send.limits);
    }

    #[test]
    fn overlong_body_is_refused_and_keeps_the_client_msg_id(send in valid_send(), extra in 1usize..40) {
        let limits = FrameLimits { max_body_chars: send.expected.body.chars().count() };
        let longer: String = send.expected.body.chars().chain(std::iter::repeat_n('x', extra)).collect();
        let fields: Vec<(String, Value)> = send
            .fields
            .iter()
            .map(|(k, v)| if k == "body" { (k.clone(), Value::String(longer.clone())) } else { (k.clone(), v.clone()) })
            .collect();
        let text = write_object(&fields, false);
        let refused = parse_request(text.as_bytes(), Encoding::Json, send.uid, limits).expect_err("an overlong body must be refused");
        prop_assert_eq!(refused.reason, Reason::BodyTooLong);
        prop_assert_eq!(refused.client_msg_id, Some(send.expected.client_msg_id));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in vec(any::<u8>(), 0..256)) {
        oracles::check_frame(&bytes);
    }

    /// Objects with the frame's own keys, each value plausible or of any JSON type, reach every
    /// branch of validation, accepted sends included — in JSON and in MessagePack.
    #[test]
    fn arbitrary_frame_shaped_objects_never_panic_and_sends_keep_the_limits(
        fields in frame_fields(),
        uid in prop_oneof![3 => Just(oracles::FUZZ_UID), 1 => 1u64..20],
    ) {
        let frame = Value::Object(fields.into_iter().collect());
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            oracles::check_frame_with(&encoding.encode(&frame), encoding, uid, oracles::FUZZ_LIMITS);
        }
    }
}

/// Each frame field present or not, with a value a client might send or any JSON at all.
fn frame_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    let field = |key: &'static str, plausible: BoxedStrategy<Value>| {
        proptest::option::weighted(0.9, prop_oneof![6 => plausible, 1 => json_value()])
            .prop_map(move |value| value.map(|v| (key.to_owned(), v)))
    };
    let small_id =
        || prop_oneof![(0u64..20).prop_map(Value::from), (0u64..20).prop_map(|n| Value::from(n.to_string()))];
    let text = |max: usize| hostile_text(max).prop_map(Value::from).boxed();
    let kind = prop_oneof![4 => Just("SINGLE_CHAT"), 1 => select(vec!["ACK", "PING", "AUTH", "single_chat", ""])];
    let uid = oracles::FUZZ_UID;
    let from = prop_oneof![Just(Value::from(uid)), Just(Value::from(uid.to_string())), Just(Value::Null), small_id()];
    (
        field("type", kind.prop_map(Value::from).boxed()),
        field("clientMsgId", prop_oneof![text(70), any::<u64>().prop_map(Value::from)].boxed()),
        field("serverMsgId", small_id().boxed()),
        field("from", from.boxed()),
        field("to", small_id().boxed()),
        field("ackType", select(vec!["delivered", "read", "saved", "accepted"]).prop_map(Value::from).boxed()),
        field("msgType", text(20)),
        field("body", text(80)),
        field("token", text(20)),
    )
        .prop_map(|(a, b, c, d, e, f, g, h, i)| [a, b, c, d, e, f, g, h, i].into_iter().flatten().collect())
}

/// Any JSON value, with the numbers and strings validation cares about overrepresented.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        id().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        select(vec!["0", "7", "-1", "1e3", "18446744073709551616", "delivered", "read", "TEXT", ""])
            .prop_map(Value::from),
        hostile_text(80).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-z]{1,4}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------- stream records

fn chat_message() -> impl Strategy<Value = ChatMessage> {
    (id(), id(), id(), hostile_text(24), hostile_text(8), hostile_text(64), id()).prop_map(
        |(id, from, to, client_msg_id, msg_type, body, seq)| ChatMessage {
            id,
            from,
            to,
            client_msg_id,
            msg_type,
            body,
            seq,
        },
    )
}

fn accepted() -> impl Strategy<Value = Accepted> {
    (chat_message(), any::<u16>(), any::<u64>(), proptest::option::of(any::<u64>()), any::<bool>()).prop_map(
        |(msg, node, conn, pushed_at_epoch, path_claim)| Accepted {
            msg,
            origin: Origin { node, conn },
            pushed_at_epoch,
            path_claim,
        },
    )
}

fn push_batch() -> impl Strategy<Value = PushBatch> {
    let push = (id(), proptest::option::of(any::<u64>()), server_frame()).prop_map(|(user, conn, frame)| Push {
        user,
        conn,
        frame,
    });
    vec(push, 0..6).prop_map(|pushes| PushBatch { pushes })
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn accepted_records_round_trip(entry in accepted()) {
        prop_assert_eq!(record::decode::<Accepted>(&record::encode(&entry)).ok(), Some(entry));
    }

    #[test]
    fn push_batches_round_trip(batch in push_batch()) {
        prop_assert_eq!(record::decode::<PushBatch>(&record::encode(&batch)).ok(), Some(batch));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_record_decoder(bytes in vec(any::<u8>(), 0..256)) {
        oracles::check_record(&bytes);
    }

    /// Valid records with a byte changed, cut short or extended: close to valid is where decoders break.
    #[test]
    fn damaged_records_never_panic_the_record_decoder(
        entry in accepted(),
        batch in push_batch(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        for mut bytes in [record::encode(&entry), record::encode(&batch)] {
            let i = at.index(bytes.len());
            bytes[i] = byte;
            oracles::check_record(&bytes);
            bytes.truncate(cut.index(bytes.len()));
            oracles::check_record(&bytes);
            bytes.extend_from_slice(&[0xdc, 0xff, 0xff]);
            oracles::check_record(&bytes);
        }
    }
}

// ---------------------------------------------------------------- config loader

/// `(section, key)` of every config key, from the defaults themselves so new keys are covered.
fn known_keys() -> Vec<(String, String)> {
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    let mut keys = Vec::new();
    for (section, table) in defaults {
        for key in table.as_table().expect("every top-level key is a section").keys() {
            keys.push((section.clone(), key.clone()));
        }
    }
    keys
}

/// A TOML literal (or something that nearly is one) as it would appear after `=`.
fn toml_value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..5000).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        select(vec![
            "true",
            "false",
            "0",
            "-1",
            "1.5",
            "nan",
            "inf",
            "1e999",
            "99999999999999999999",
            "0x10",
            "1_000",
            "[]",
            "[1, \"a\"]",
            "{}",
            "{ a = 1 }",
            "\"\"",
            "\"127.0.0.1:0\"",
            "\"[::1]:80\"",
            "\"redis://h:1/2\"",
            "\"unix:///tmp/r.sock\"",
            "\"mysql://root@127.0.0.1:3306/im\"",
            "\"mysql://u:p@h:1/db?pool_min=9&pool_max=1\"",
            "\"mysql://h/db?stmt_cache_size=x\"",
            "\"mysql://:@:/\"",
            "\"mysql://[::1\"",
            "\"0123456789abcdef\"",
            "1979-05-27T07:32:00Z",
            "'''multi\nline'''",
            "\"unterminated",
            "= =",
        ])
        .prop_map(String::from),
        hostile_text(24).prop_map(|s| toml::Value::String(s).to_string()),
        hostile_text(24),
    ]
}

/// A line of a config file: sections, keys and values mostly right, sometimes not.
fn toml_line() -> impl Strategy<Value = String> {
    let keys = known_keys();
    let sections: Vec<String> = keys.iter().map(|(s, _)| s.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    prop_oneof![
        2 => select(sections.clone()).prop_map(|s| format!("[{s}]")),
        1 => "[a-z_.]{0,10}".prop_map(|s| format!("[{s}]")),
        1 => select(sections).prop_map(|s| format!("[[{s}]]")),
        5 => (select(keys.clone()), toml_value_text()).prop_map(|((_, k), v)| format!("{k} = {v}")),
        2 => (select(keys), toml_value_text()).prop_map(|((s, k), v)| format!("{s}.{k} = {v}")),
        1 => ("[a-z_\"]{1,8}", toml_value_text()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => hostile_text(30).prop_map(|s| s.replace('\n', " ")),
        1 => Just("# comment".to_owned()),
        1 => Just(String::new()),
    ]
}

/// Environment pairs: well-formed overrides, malformed `IM__` names, and unrelated variables.
fn env_pair() -> impl Strategy<Value = (String, String)> {
    let keys = known_keys();
    let name = prop_oneof![
        4 => select(keys).prop_map(|(s, k)| format!("IM__{}__{}", s.to_uppercase(), k.to_uppercase())),
        2 => vec("[A-Za-z_.]{0,6}", 0..4).prop_map(|parts| format!("IM__{}", parts.join("__"))),
        1 => select(vec!["PATH", "HOME", "IM_", "IM", "im__cluster__shards"]).prop_map(String::from),
    ];
    let value = prop_oneof![toml_value_text(), hostile_text(24)];
    (name, value)
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_config_text_loads_or_names_the_key_or_file(lines in vec(toml_line(), 0..12)) {
        oracles::check_config(&lines.join("\n"));
    }

    #[test]
    fn arbitrary_environment_loads_or_names_the_key(env in vec(env_pair(), 0..6)) {
        oracles::check_config_result(Config::load_with_env(None, env));
    }

    #[test]
    fn arbitrary_utf8_never_panics_the_config_loader(text in hostile_text(200)) {
        oracles::check_config(&text);
    }
}

// ---------------------------------------------------------------- inputs the fuzzers and proptest found

/// config_loader, 2026-11-25: a variable name with a backtick, dots and a NUL made an unknown-field
/// error whose key the oracle could not find in its message. The loader was right (the message quotes
/// the whole name); the oracle now tries every split of the key.
#[test]
fn config_key_with_backticks_dots_and_nul_is_named() {
    let input = b"M__OIT_WPH__SAEENABLED=false\nIM__CSTL^^^`listencd..^^^^\x00NS='[\"hMYSQL__URL=\"mauthysql://u:p@h:3306/db?pool_min=1&pool_max=4\"\n";
    oracles::check_config(std::str::from_utf8(input).expect("the input is UTF-8"));
}
