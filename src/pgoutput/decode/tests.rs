use super::*;
use proptest::prelude::*;
use std::sync::OnceLock;
use TupleValue::{Null, Unchanged};

/// One captured message: the LSN `pg_logical_slot_peek_binary_changes`
/// reported for it, and its bytes.
pub(in crate::pgoutput) struct Captured {
    pub lsn: Lsn,
    pub bytes: Bytes,
}

fn parse_hex(hex: &str) -> Vec<u8> {
    assert_eq!(hex.len() % 2, 0, "odd hex length");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn parse_fixture(text: &str) -> Vec<Captured> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (lsn, hex) = line.split_once(' ').expect("'<lsn> <hex>' line");
            Captured {
                lsn: lsn.parse().expect("lsn"),
                bytes: Bytes::from(parse_hex(hex.trim())),
            }
        })
        .collect()
}

/// Messages captured from PostgreSQL 15 with text-format values
/// (see testdata/capture.sql).
pub(in crate::pgoutput) fn text_fixture() -> &'static [Captured] {
    static F: OnceLock<Vec<Captured>> = OnceLock::new();
    F.get_or_init(|| parse_fixture(include_str!("../testdata/pg15_text.hex")))
}

/// The same stream decoded with `binary 'true'`.
pub(in crate::pgoutput) fn binary_fixture() -> &'static [Captured] {
    static F: OnceLock<Vec<Captured>> = OnceLock::new();
    F.get_or_init(|| parse_fixture(include_str!("../testdata/pg15_binary.hex")))
}

fn all_fixtures() -> impl Iterator<Item = &'static Captured> {
    text_fixture().iter().chain(binary_fixture())
}

fn t(v: &'static [u8]) -> TupleValue {
    TupleValue::Text(Bytes::from_static(v))
}

fn b(v: impl AsRef<[u8]>) -> TupleValue {
    TupleValue::Binary(Bytes::copy_from_slice(v.as_ref()))
}

fn tuple<const N: usize>(values: [TupleValue; N]) -> Tuple {
    Tuple(values.into())
}

fn begin(final_lsn: u64, commit_ts_us: i64, xid: u32) -> Message {
    Message::Begin {
        final_lsn: Lsn(final_lsn),
        commit_ts_us,
        xid,
    }
}

fn commit(commit_lsn: u64, end_lsn: u64, commit_ts_us: i64) -> Message {
    Message::Commit {
        flags: 0,
        commit_lsn: Lsn(commit_lsn),
        end_lsn: Lsn(end_lsn),
        commit_ts_us,
    }
}

fn col(key: bool, name: &str, type_oid: u32, type_mod: i32) -> RelColumn {
    RelColumn {
        flags: u8::from(key),
        name: name.into(),
        type_oid,
        type_mod,
    }
}

fn relation(oid: u32, schema: &str, name: &str, ri: u8, columns: Vec<RelColumn>) -> Message {
    Message::Relation {
        oid,
        schema: schema.into(),
        name: name.into(),
        replica_identity: ri,
        columns,
    }
}

const ACCOUNTS: u32 = 16392;
const AUDIT: u32 = 16399;
const CUSTOMERS: u32 = 16405;
const MOOD: u32 = 16385;

fn accounts_rel() -> Message {
    relation(
        ACCOUNTS,
        "public",
        "accounts",
        b'd',
        vec![
            col(true, "id", 23, -1),
            col(false, "name", 25, -1),
            // numeric(12,2): ((12 << 16) | 2) + VARHDRSZ
            col(false, "balance", 1700, (12 << 16 | 2) + 4),
            col(false, "active", 16, -1),
            col(false, "created_at", 1184, -1),
            col(false, "doc", 3802, -1),
            col(false, "blob", 17, -1),
            col(false, "big", 20, -1),
            col(false, "feeling", MOOD, -1),
            col(false, "note", 25, -1),
        ],
    )
}

fn audit_rel() -> Message {
    // REPLICA IDENTITY FULL: every column is flagged as key.
    relation(
        AUDIT,
        "public",
        "audit",
        b'f',
        vec![col(true, "id", 20, -1), col(true, "payload", 25, -1)],
    )
}

fn customers_rel() -> Message {
    relation(
        CUSTOMERS,
        "eu",
        "customers",
        b'd',
        vec![col(true, "id", 23, -1), col(false, "email", 25, -1)],
    )
}

/// The TOASTed `note` value: `repeat('0123456789', 400)`.
fn note() -> Bytes {
    Bytes::from("0123456789".repeat(400))
}

fn id_only(id: TupleValue) -> Tuple {
    let mut v = vec![Null; 10];
    v[0] = id;
    Tuple(v)
}

fn accounts_row1(balance: &'static [u8], note: TupleValue) -> Tuple {
    tuple([
        t(b"1"),
        t("Zoë".as_bytes()),
        t(balance),
        t(b"t"),
        t(b"2024-05-06 07:08:09.123456+00"),
        t(br#"{"a": [1, 2], "b": null}"#),
        t(br"\xdeadbeef00"),
        t(b"-9007199254740993"),
        t(b"happy"),
        note,
    ])
}

// Commit times reported by the server (µs since the Unix epoch). The
// last transaction's was set with pg_replication_origin_xact_setup to
// 2024-01-02 03:04:05 UTC, which pins the epoch conversion.
const TS_732: i64 = 1_795_436_712_246_895;
const TS_733: i64 = 1_795_436_712_247_710;
const TS_734: i64 = 1_795_436_712_247_884;
const TS_735: i64 = 1_795_436_712_247_997;
const TS_736: i64 = 1_795_436_712_248_191;
const TS_737: i64 = 1_795_436_712_248_366;
const TS_738: i64 = 1_795_436_712_248_461;
const TS_739: i64 = 1_795_436_712_249_521;
const TS_740: i64 = 1_795_436_712_250_164;
const TS_ORIGIN: i64 = 1_704_164_645_000_000;

/// The text-format stream, message by message (see capture.sql).
fn expected_text_stream() -> Vec<Message> {
    vec![
        // BEGIN; INSERT id 1 (all types); INSERT id 2 (NULLs); COMMIT
        begin(0x1538E60, TS_732, 732),
        Message::Type {
            oid: MOOD,
            schema: "public".into(),
            name: "mood".into(),
        },
        accounts_rel(),
        Message::Insert {
            rel: ACCOUNTS,
            new: accounts_row1(b"1234.50", TupleValue::Text(note())),
        },
        Message::Insert {
            rel: ACCOUNTS,
            new: id_only(t(b"2")),
        },
        commit(0x1538E60, 0x1538E90, TS_732),
        // UPDATE balance: the TOASTed note is not carried ('u')
        begin(0x1538F88, TS_733, 733),
        Message::Update {
            rel: ACCOUNTS,
            old: None,
            new: accounts_row1(b"1235.50", Unchanged),
        },
        commit(0x1538F88, 0x1538FB8, TS_733),
        // UPDATE of the primary key: old key image ('K')
        begin(0x1539058, TS_734, 734),
        Message::Update {
            rel: ACCOUNTS,
            old: Some((OldKind::Key, id_only(t(b"2")))),
            new: id_only(t(b"3")),
        },
        commit(0x1539058, 0x1539088, TS_734),
        // DELETE, default replica identity ('K')
        begin(0x15390D0, TS_735, 735),
        Message::Delete {
            rel: ACCOUNTS,
            old: (OldKind::Key, id_only(t(b"3"))),
        },
        commit(0x15390D0, 0x1539100, TS_735),
        // REPLICA IDENTITY FULL table
        begin(0x1539188, TS_736, 736),
        audit_rel(),
        Message::Insert {
            rel: AUDIT,
            new: tuple([t(b"10"), t(b"first")]),
        },
        Message::Insert {
            rel: AUDIT,
            new: tuple([t(b"11"), Null]),
        },
        commit(0x1539188, 0x15391B8, TS_736),
        begin(0x1539220, TS_737, 737),
        Message::Update {
            rel: AUDIT,
            old: Some((OldKind::Full, tuple([t(b"10"), t(b"first")]))),
            new: tuple([t(b"10"), t(b"second")]),
        },
        commit(0x1539220, 0x1539250, TS_737),
        begin(0x1539298, TS_738, 738),
        Message::Delete {
            rel: AUDIT,
            old: (OldKind::Full, tuple([t(b"11"), Null])),
        },
        commit(0x1539298, 0x15392C8, TS_738),
        // TRUNCATE audit, eu.customers RESTART IDENTITY
        begin(0x153A958, TS_739, 739),
        audit_rel(),
        customers_rel(),
        Message::Truncate {
            options: 2,
            rels: vec![AUDIT, CUSTOMERS],
        },
        commit(0x153A958, 0x153ABD8, TS_739),
        // pg_logical_emit_message(true, 'p', 'x')
        begin(0x153AC10, TS_740, 740),
        Message::LogicalMessage {
            transactional: true,
            lsn: Lsn(0x153AC10),
            prefix: "p".into(),
            content: Bytes::from_static(b"x"),
        },
        commit(0x153AC10, 0x153AC40, TS_740),
        // pg_logical_emit_message(false, 'pgrelay', '\x00ff')
        Message::LogicalMessage {
            transactional: false,
            lsn: Lsn(0x153AC80),
            prefix: "pgrelay".into(),
            content: Bytes::from_static(b"\x00\xff"),
        },
        // under replication origin pgrelay_eu, origin lsn 0/ABCDEF
        begin(0x153B040, TS_ORIGIN, 742),
        Message::Origin {
            origin_lsn: Lsn(0xABCDEF),
            name: "pgrelay_eu".into(),
        },
        customers_rel(),
        Message::Insert {
            rel: CUSTOMERS,
            new: tuple([t(b"1"), t(b"a@example.eu")]),
        },
        commit(0x153B040, 0x153B088, TS_ORIGIN),
    ]
}

fn decode_all(f: &[Captured]) -> Vec<Message> {
    f.iter()
        .map(|c| decode(c.bytes.clone()).unwrap_or_else(|e| panic!("at {}: {e}", c.lsn)))
        .collect()
}

#[test]
fn real_pg15_text_stream() {
    let got = decode_all(text_fixture());
    let want = expected_text_stream();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "message {i} at {}", text_fixture()[i].lsn);
    }
}

#[test]
fn real_pg15_lsns_agree_with_slot() {
    // A Commit's end_lsn is the position the slot reports for it; the
    // transactional message's own LSN is where it was emitted.
    for c in text_fixture() {
        match decode(c.bytes.clone()).unwrap() {
            Message::Commit { end_lsn, .. } => assert_eq!(end_lsn, c.lsn),
            Message::LogicalMessage { lsn, .. } => assert_eq!(lsn, c.lsn),
            _ => {}
        }
    }
}

#[test]
fn real_pg15_origin_commit_time_is_unix_epoch() {
    // 2024-01-02 03:04:05 UTC, set with pg_replication_origin_xact_setup.
    assert_eq!(TS_ORIGIN, 1_704_164_645 * 1_000_000);
    let last = text_fixture().last().unwrap();
    assert!(matches!(
        decode(last.bytes.clone()).unwrap(),
        Message::Commit {
            commit_ts_us: TS_ORIGIN,
            ..
        }
    ));
}

fn values(m: &Message) -> Vec<&Tuple> {
    match m {
        Message::Insert { new, .. } => vec![new],
        Message::Update { old, new, .. } => old.iter().map(|(_, t)| t).chain([new]).collect(),
        Message::Delete { old, .. } => vec![&old.1],
        _ => vec![],
    }
}

#[test]
fn real_pg15_binary_stream() {
    let text = decode_all(text_fixture());
    let bin = decode_all(binary_fixture());
    assert_eq!(text.len(), bin.len());
    for (i, (t, b)) in text.iter().zip(&bin).enumerate() {
        let (tv, bv) = (values(t), values(b));
        if tv.is_empty() {
            // Begin, Commit, Relation, Type, Truncate, messages, Origin
            // do not depend on the value format.
            assert_eq!(t, b, "message {i}");
            continue;
        }
        assert_eq!(std::mem::discriminant(t), std::mem::discriminant(b));
        // Same shape: Null and Unchanged where the text stream has them,
        // Binary where it has Text.
        for (tt, bt) in tv.iter().zip(&bv) {
            assert_eq!(tt.0.len(), bt.0.len(), "message {i}");
            for (x, y) in tt.0.iter().zip(&bt.0) {
                match (x, y) {
                    (TupleValue::Text(_), TupleValue::Binary(_)) => {}
                    (x, y) => assert_eq!(x, y, "message {i}"),
                }
            }
        }
    }

    // The first accounts row, value by value (int4, text, numeric,
    // bool, timestamptz, jsonb, bytea, int8, enum, TOASTed text).
    let Message::Insert { rel, new } = &bin[3] else {
        panic!("expected Insert, got {:?}", bin[3]);
    };
    assert_eq!(*rel, ACCOUNTS);
    let want = tuple([
        b([0, 0, 0, 1]),
        b("Zoë".as_bytes()),
        // numeric send: ndigits 2, weight 0, sign +, dscale 2, 1234 5000
        b([0, 2, 0, 0, 0, 0, 0, 2, 0x04, 0xd2, 0x13, 0x88]),
        b([1]),
        b([0x00, 0x02, 0xba, 0xc2, 0x80, 0x1b, 0x6a, 0x80]),
        b(b"\x01{\"a\": [1, 2], \"b\": null}"),
        b([0xde, 0xad, 0xbe, 0xef, 0x00]),
        b((-9_007_199_254_740_993_i64).to_be_bytes()),
        b(b"happy"),
        TupleValue::Binary(note()),
    ]);
    assert_eq!(new, &want);
    // The binary timestamptz is µs since 2000-01-01.
    let TupleValue::Binary(ts) = &new.0[4] else {
        unreachable!()
    };
    let pg_us = i64::from_be_bytes(ts[..].try_into().unwrap());
    // 2024-05-06 07:08:09.123456 UTC
    assert_eq!(pg_to_unix_us(pg_us), 1_714_979_289_123_456);

    let Message::Update { old, new, .. } = &bin[7] else {
        panic!("expected Update, got {:?}", bin[7]);
    };
    assert_eq!(old, &None);
    assert_eq!(
        new.0[2],
        b([0, 2, 0, 0, 0, 0, 0, 2, 0x04, 0xd3, 0x13, 0x88])
    );
    assert_eq!(new.0[9], Unchanged);

    assert_eq!(
        bin[21],
        Message::Update {
            rel: AUDIT,
            old: Some((OldKind::Full, tuple([b(10_i64.to_be_bytes()), b(b"first")]))),
            new: tuple([b(10_i64.to_be_bytes()), b(b"second")]),
        }
    );
}

#[test]
fn values_share_the_input_buffer() {
    let c = &text_fixture()[3];
    let Message::Insert { new, .. } = decode(c.bytes.clone()).unwrap() else {
        panic!()
    };
    let TupleValue::Text(note) = &new.0[9] else {
        panic!()
    };
    let range = c.bytes.as_ptr_range();
    assert!(range.contains(&note.as_ptr()), "value was copied");
}

#[test]
fn every_truncation_of_real_messages_is_an_error() {
    for c in all_fixtures() {
        for len in 0..c.bytes.len() {
            let r = decode(c.bytes.slice(..len));
            assert!(r.is_err(), "prefix {len} of {} decoded: {r:?}", c.lsn);
        }
    }
}

#[test]
fn trailing_bytes_after_real_messages_are_an_error() {
    for c in all_fixtures() {
        let mut v = c.bytes.to_vec();
        v.push(0);
        let len = c.bytes.len();
        assert_eq!(
            decode(Bytes::from(v)).unwrap_err(),
            DecodeError::TrailingBytes {
                msg: decode_err_name(c.bytes[0]),
                offset: len,
                extra: 1
            }
        );
    }
}

fn decode_err_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "LogicalMessage",
        _ => unreachable!(),
    }
}

fn err(bytes: &[u8]) -> String {
    decode(Bytes::copy_from_slice(bytes))
        .unwrap_err()
        .to_string()
}

#[test]
fn error_messages() {
    assert_eq!(err(b""), "empty pgoutput message");
    assert_eq!(err(b"Z"), "unknown pgoutput message tag 0x5a");
    assert_eq!(err(b"S\0\0\0\x01"), "unknown pgoutput message tag 0x53");
    // Insert, 2 columns: 't' len 3 "abc", then 't' and half a length.
    let mut m = b"I\0\0\x40\x08N\0\x02t\0\0\0\x03abct".to_vec();
    m.extend([0, 0]);
    assert_eq!(
        err(&m),
        "truncated Insert message at offset 17: need 4 bytes, have 2"
    );
    assert_eq!(
        err(b"I\0\0\x40\x08N\0\x01t\xff\xff\xff\xff"),
        "negative value length -1 in Insert message at offset 9"
    );
    assert_eq!(
        err(b"I\0\0\x40\x08N\0\x01t\0\0\0\x05ab"),
        "truncated Insert message at offset 13: need 5 bytes, have 2"
    );
    assert_eq!(
        err(b"I\0\0\x40\x08N\0\x01x"),
        "unknown tuple value kind 0x78 in Insert message at offset 8"
    );
    assert_eq!(
        err(b"I\0\0\x40\x08K\0\x00"),
        "unexpected byte 0x4b in Insert message at offset 5: expected 'N'"
    );
    assert_eq!(
        err(b"I\0\0\x40\x08N\xff\xff"),
        "negative column count -1 in Insert message at offset 6"
    );
    assert_eq!(
        err(b"U\0\0\x40\x08X"),
        "unexpected byte 0x58 in Update message at offset 5: expected 'K', 'O' or 'N'"
    );
    assert_eq!(
        err(b"U\0\0\x40\x08K\0\x00K\0\x00"),
        "unexpected byte 0x4b in Update message at offset 8: expected 'N'"
    );
    assert_eq!(
        err(b"D\0\0\x40\x08N\0\x00"),
        "unexpected byte 0x4e in Delete message at offset 5: expected 'K' or 'O'"
    );
    assert_eq!(
        err(b"Y\0\0"),
        "truncated Type message at offset 1: need 4 bytes, have 2"
    );
    assert_eq!(
        err(b"Y\0\0\0\x01public"),
        "unterminated string in Type message at offset 5"
    );
    assert_eq!(
        err(b"Y\0\0\0\x01pub\xfflic\0t\0"),
        "invalid UTF-8 in string in Type message at offset 5"
    );
    assert_eq!(
        err(b"B\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02\0\0\0\x03\0\0"),
        "2 trailing bytes after Begin message at offset 21"
    );
    assert_eq!(
        err(b"T\x80\0\0\0\0"),
        "negative relation count -2147483648 in Truncate message at offset 1"
    );
    assert_eq!(
        err(b"M\x01\0\0\0\0\0\0\0\x01p\0\xff\xff\xff\xfe"),
        "negative content length -2 in LogicalMessage message at offset 12"
    );
}

#[test]
fn huge_counts_fail_without_allocating() {
    // A count the buffer cannot back is a truncation, not an OOM.
    assert!(matches!(
        decode(Bytes::from_static(b"T\x7f\xff\xff\xff\0\0\0\0\x01")),
        Err(DecodeError::Truncated { need, .. }) if need == 0x7fff_ffff * 4
    ));
    assert!(matches!(
        decode(Bytes::from_static(b"I\0\0\0\x01N\x7f\xffn")),
        Err(DecodeError::Truncated { offset: 9, .. })
    ));
    assert!(matches!(
        decode(Bytes::from_static(b"R\0\0\0\x01s\0t\0d\x7f\xff")),
        Err(DecodeError::Truncated { offset: 12, .. })
    ));
    assert!(matches!(
        decode(Bytes::from_static(
            b"M\0\0\0\0\0\0\0\0\x01p\0\x7f\xff\xff\xff"
        )),
        Err(DecodeError::Truncated {
            need: 0x7fff_ffff,
            ..
        })
    ));
}

#[test]
fn empty_strings_and_tuples() {
    assert_eq!(
        decode(Bytes::from_static(b"Y\0\0\0\x07\0\0")).unwrap(),
        Message::Type {
            oid: 7,
            schema: String::new(),
            name: String::new()
        }
    );
    assert_eq!(
        decode(Bytes::from_static(b"I\0\0\0\x07N\0\0")).unwrap(),
        Message::Insert {
            rel: 7,
            new: Tuple::default()
        }
    );
    assert_eq!(
        decode(Bytes::from_static(b"T\0\0\0\0\x01")).unwrap(),
        Message::Truncate {
            options: 1,
            rels: vec![]
        }
    );
}

#[test]
fn timestamps_saturate() {
    // PostgreSQL's +/-infinity timestamps must not overflow.
    let mut m = vec![b'B'];
    m.extend(1_u64.to_be_bytes());
    m.extend(i64::MAX.to_be_bytes());
    m.extend(1_u32.to_be_bytes());
    assert_eq!(decode(Bytes::from(m)).unwrap(), begin(1, i64::MAX, 1));
    assert_eq!(unix_to_pg_us(i64::MIN), i64::MIN);
}

/// Test-only encoder, the inverse of [`decode`].
pub(in crate::pgoutput) fn encode(m: &Message) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend(v.as_bytes());
        out.push(0);
    }
    fn tup(out: &mut Vec<u8>, t: &Tuple) {
        out.extend((t.0.len() as i16).to_be_bytes());
        for v in &t.0 {
            match v {
                Null => out.push(b'n'),
                Unchanged => out.push(b'u'),
                TupleValue::Text(x) | TupleValue::Binary(x) => {
                    out.push(if matches!(v, TupleValue::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend((x.len() as i32).to_be_bytes());
                    out.extend(x);
                }
            }
        }
    }
    fn kind(k: OldKind) -> u8 {
        match k {
            OldKind::Key => b'K',
            OldKind::Full => b'O',
        }
    }
    let mut o = Vec::new();
    match m {
        Message::Begin {
            final_lsn,
            commit_ts_us,
            xid,
        } => {
            o.push(b'B');
            o.extend(final_lsn.0.to_be_bytes());
            o.extend(unix_to_pg_us(*commit_ts_us).to_be_bytes());
            o.extend(xid.to_be_bytes());
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_ts_us,
        } => {
            o.push(b'C');
            o.push(*flags);
            o.extend(commit_lsn.0.to_be_bytes());
            o.extend(end_lsn.0.to_be_bytes());
            o.extend(unix_to_pg_us(*commit_ts_us).to_be_bytes());
        }
        Message::Origin { origin_lsn, name } => {
            o.push(b'O');
            o.extend(origin_lsn.0.to_be_bytes());
            s(&mut o, name);
        }
        Message::Relation {
            oid,
            schema,
            name,
            replica_identity,
            columns,
        } => {
            o.push(b'R');
            o.extend(oid.to_be_bytes());
            s(&mut o, schema);
            s(&mut o, name);
            o.push(*replica_identity);
            o.extend((columns.len() as i16).to_be_bytes());
            for c in columns {
                o.push(c.flags);
                s(&mut o, &c.name);
                o.extend(c.type_oid.to_be_bytes());
                o.extend(c.type_mod.to_be_bytes());
            }
        }
        Message::Type { oid, schema, name } => {
            o.push(b'Y');
            o.extend(oid.to_be_bytes());
            s(&mut o, schema);
            s(&mut o, name);
        }
        Message::Insert { rel, new } => {
            o.push(b'I');
            o.extend(rel.to_be_bytes());
            o.push(b'N');
            tup(&mut o, new);
        }
        Message::Update { rel, old, new } => {
            o.push(b'U');
            o.extend(rel.to_be_bytes());
            if let Some((k, t)) = old {
                o.push(kind(*k));
                tup(&mut o, t);
            }
            o.push(b'N');
            tup(&mut o, new);
        }
        Message::Delete { rel, old } => {
            o.push(b'D');
            o.extend(rel.to_be_bytes());
            o.push(kind(old.0));
            tup(&mut o, &old.1);
        }
        Message::Truncate { options, rels } => {
            o.push(b'T');
            o.extend((rels.len() as i32).to_be_bytes());
            o.push(*options);
            for r in rels {
                o.extend(r.to_be_bytes());
            }
        }
        Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            o.push(b'M');
            o.push(u8::from(*transactional));
            o.extend(lsn.0.to_be_bytes());
            s(&mut o, prefix);
            o.extend((content.len() as i32).to_be_bytes());
            o.extend(content);
        }
    }
    o
}

#[test]
fn encoder_reproduces_real_messages() {
    // Validates the test encoder used by the round-trip property.
    for c in all_fixtures() {
        assert_eq!(
            encode(&decode(c.bytes.clone()).unwrap()),
            c.bytes,
            "{}",
            c.lsn
        );
    }
}

fn ident() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ .\"éü€]{0,12}"
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn ts() -> impl Strategy<Value = i64> {
    -(1_i64 << 62)..(1_i64 << 62)
}

fn value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(Null),
        Just(Unchanged),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|v| TupleValue::Text(Bytes::from(v))),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|v| TupleValue::Binary(Bytes::from(v))),
    ]
}

fn tuple_s() -> impl Strategy<Value = Tuple> {
    prop::collection::vec(value(), 0..12).prop_map(Tuple)
}

fn old_kind() -> impl Strategy<Value = OldKind> {
    prop_oneof![Just(OldKind::Key), Just(OldKind::Full)]
}

fn message() -> impl Strategy<Value = Message> {
    let column = (any::<u8>(), ident(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_mod)| RelColumn {
            flags,
            name,
            type_oid,
            type_mod,
        },
    );
    prop_oneof![
        (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_ts_us, xid)| {
            Message::Begin {
                final_lsn,
                commit_ts_us,
                xid,
            }
        }),
        (any::<u8>(), lsn(), lsn(), ts()).prop_map(|(flags, commit_lsn, end_lsn, ts)| {
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_ts_us: ts,
            }
        }),
        (lsn(), ident()).prop_map(|(origin_lsn, name)| Message::Origin { origin_lsn, name }),
        (
            any::<u32>(),
            ident(),
            ident(),
            any::<u8>(),
            prop::collection::vec(column, 0..8)
        )
            .prop_map(|(oid, schema, name, replica_identity, columns)| {
                Message::Relation {
                    oid,
                    schema,
                    name,
                    replica_identity,
                    columns,
                }
            }),
        (any::<u32>(), ident(), ident()).prop_map(|(oid, schema, name)| Message::Type {
            oid,
            schema,
            name
        }),
        (any::<u32>(), tuple_s()).prop_map(|(rel, new)| Message::Insert { rel, new }),
        (
            any::<u32>(),
            prop::option::of((old_kind(), tuple_s())),
            tuple_s()
        )
            .prop_map(|(rel, old, new)| Message::Update { rel, old, new }),
        (any::<u32>(), old_kind(), tuple_s())
            .prop_map(|(rel, k, t)| Message::Delete { rel, old: (k, t) }),
        (any::<u8>(), prop::collection::vec(any::<u32>(), 0..8))
            .prop_map(|(options, rels)| Message::Truncate { options, rels }),
        (
            any::<bool>(),
            lsn(),
            ident(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(transactional, lsn, prefix, content)| {
                Message::LogicalMessage {
                    transactional,
                    lsn,
                    prefix,
                    content: Bytes::from(content),
                }
            }),
    ]
}

const TAGS: &[u8] = b"BCORYIUDTMZ";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_bodies_after_valid_tags_never_panic(
        tag in prop::sample::select(TAGS),
        body in prop::collection::vec(
            prop_oneof![any::<u8>(), prop::sample::select(&b"\0NKOntub\xff"[..])],
            0..128,
        ),
    ) {
        let mut v = vec![tag];
        v.extend(body);
        let _ = decode(Bytes::from(v));
    }

    #[test]
    fn mutated_real_messages_never_panic(
        which in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let all: Vec<&Captured> = all_fixtures().collect();
        let mut v = all[which.index(all.len())].bytes.to_vec();
        for (at, byte) in flips {
            let i = at.index(v.len());
            v[i] = byte;
        }
        if let Some(cut) = cut {
            v.truncate(cut.index(v.len() + 1));
        }
        let _ = decode(Bytes::from(v));
    }

    #[test]
    fn encode_decode_round_trip(m in message()) {
        let bytes = Bytes::from(encode(&m));
        prop_assert_eq!(decode(bytes.clone()), Ok(m));
        // And no strict prefix of a valid message decodes.
        for len in 0..bytes.len() {
            prop_assert!(decode(bytes.slice(..len)).is_err());
        }
    }
}

/// Rough decode rates (no assertion):
/// `cargo test --release --lib pgoutput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    fn rate(what: &str, msgs: &[Bytes], rounds: usize) {
        let start = std::time::Instant::now();
        let mut n = 0_usize;
        for _ in 0..rounds {
            for m in msgs {
                n += usize::from(decode(m.clone()).is_ok());
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!("{what}: {n} in {secs:.3}s, {:.0}/s", n as f64 / secs);
    }
    let stream: Vec<Bytes> = text_fixture().iter().map(|c| c.bytes.clone()).collect();
    rate("whole captured stream", &stream, 50_000);
    // The 10-column accounts row with its 4 kB TOASTed value.
    rate("10-column Insert", &stream[3..4], 2_000_000);
}
