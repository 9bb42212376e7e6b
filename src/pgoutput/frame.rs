//! The `CopyData` messages of a physical/logical replication stream
//! (`START_REPLICATION ... LOGICAL`), as described in PostgreSQL's
//! "Streaming Replication Protocol":
//!
//! ```text
//! server -> client
//!   'w' start_lsn:i64 end_lsn:i64 send_time:i64 payload...   XLogData
//!   'k' wal_end:i64 send_time:i64 reply_requested:i8         primary keepalive
//! client -> server
//!   'r' write:i64 flush:i64 apply:i64 client_time:i64 reply:i8  standby status update
//! ```
//!
//! Times on the wire are µs since 2000-01-01; here they are µs since the
//! Unix epoch.

use bytes::{BufMut, Bytes, BytesMut};

use super::decode::{pg_to_unix_us, unix_to_pg_us, DecodeError, Reader};
use crate::event::Lsn;

/// One server-to-client `CopyData` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `'w'`: WAL data; for logical replication `payload` is one `pgoutput`
    /// message (see [`decode`](super::decode())).
    XLogData {
        start_lsn: Lsn,
        end_lsn: Lsn,
        /// Server clock, µs since the Unix epoch.
        send_time_us: i64,
        payload: Bytes,
    },
    /// `'k'`: primary keepalive. When `reply_requested` is set the server
    /// wants a status update right away (or it will time us out).
    Keepalive {
        wal_end: Lsn,
        /// Server clock, µs since the Unix epoch.
        send_time_us: i64,
        reply_requested: bool,
    },
}

/// Length of an XLogData header: tag + three int64.
const XLOGDATA_HEADER: usize = 1 + 3 * 8;

/// Parse one `CopyData` payload from the replication stream. The XLogData
/// payload shares `copy_data`'s buffer. A keepalive with bytes after its
/// fields is an error.
pub fn parse_frame(copy_data: Bytes) -> Result<Frame, DecodeError> {
    let Some(&tag) = copy_data.first() else {
        return Err(DecodeError::Empty {
            what: "replication CopyData frame",
        });
    };
    match tag {
        b'w' => {
            let mut r = Reader::new(&copy_data, "XLogData");
            r.pos = 1;
            r.need(XLOGDATA_HEADER - 1)?;
            let start_lsn = r.lsn()?;
            let end_lsn = r.lsn()?;
            let send_time_us = pg_to_unix_us(r.i64()?);
            Ok(Frame::XLogData {
                start_lsn,
                end_lsn,
                send_time_us,
                payload: r.rest(),
            })
        }
        b'k' => {
            let mut r = Reader::new(&copy_data, "Keepalive");
            r.pos = 1;
            r.need(8 + 8 + 1)?;
            let wal_end = r.lsn()?;
            let send_time_us = pg_to_unix_us(r.i64()?);
            let reply_requested = r.u8()? != 0;
            r.finish()?;
            Ok(Frame::Keepalive {
                wal_end,
                send_time_us,
                reply_requested,
            })
        }
        _ => Err(DecodeError::UnknownFrameTag { tag }),
    }
}

/// Length of a standby status update: tag + four int64 + flag.
const STATUS_UPDATE_LEN: usize = 1 + 4 * 8 + 1;

/// Encode a `'r'` standby status update: the positions written, flushed and
/// applied, the client clock (`now_us`, µs since the Unix epoch, sent as µs
/// since 2000-01-01), and whether the server should reply immediately.
pub fn encode_status_update(write: Lsn, flush: Lsn, apply: Lsn, now_us: i64, reply: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(STATUS_UPDATE_LEN);
    b.put_u8(b'r');
    b.put_u64(write.0);
    b.put_u64(flush.0);
    b.put_u64(apply.0);
    b.put_i64(unix_to_pg_us(now_us));
    b.put_u8(u8::from(reply));
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::decode::tests::{encode, text_fixture};
    use crate::pgoutput::decode::PG_EPOCH_OFFSET_US;
    use crate::pgoutput::{decode, Message};
    use proptest::prelude::*;

    /// A `'w'` frame as the server builds it (times in PG epoch).
    fn xlogdata(start: u64, end: u64, pg_time: i64, payload: &[u8]) -> Bytes {
        let mut v = vec![b'w'];
        v.extend(start.to_be_bytes());
        v.extend(end.to_be_bytes());
        v.extend(pg_time.to_be_bytes());
        v.extend(payload);
        Bytes::from(v)
    }

    /// A `'k'` frame as the server builds it (times in PG epoch).
    fn keepalive(wal_end: u64, pg_time: i64, reply: u8) -> Bytes {
        let mut v = vec![b'k'];
        v.extend(wal_end.to_be_bytes());
        v.extend(pg_time.to_be_bytes());
        v.push(reply);
        Bytes::from(v)
    }

    // 2024-01-02 03:04:05 UTC in both epochs.
    const UNIX_US: i64 = 1_704_164_645_000_000;
    const PG_US: i64 = 757_479_845_000_000;

    #[test]
    fn xlogdata_carries_a_real_pgoutput_message() {
        let insert = &text_fixture()[3];
        let frame = xlogdata(0x1538C80, 0x153B088, PG_US, &insert.bytes);
        let Frame::XLogData {
            start_lsn,
            end_lsn,
            send_time_us,
            payload,
        } = parse_frame(frame.clone()).unwrap()
        else {
            panic!("expected XLogData");
        };
        assert_eq!(start_lsn, Lsn(0x1538C80));
        assert_eq!(end_lsn, Lsn(0x153B088));
        assert_eq!(send_time_us, UNIX_US);
        assert_eq!(payload, insert.bytes);
        // Zero-copy: the payload is a view of the frame.
        assert_eq!(payload.as_ptr(), frame[XLOGDATA_HEADER..].as_ptr());
        assert!(matches!(
            decode(payload).unwrap(),
            Message::Insert { rel: 16392, .. }
        ));
    }

    #[test]
    fn xlogdata_with_empty_payload() {
        assert_eq!(
            parse_frame(xlogdata(1, 2, 0, b"")).unwrap(),
            Frame::XLogData {
                start_lsn: Lsn(1),
                end_lsn: Lsn(2),
                send_time_us: PG_EPOCH_OFFSET_US,
                payload: Bytes::new(),
            }
        );
    }

    #[test]
    fn keepalive_frames() {
        assert_eq!(
            parse_frame(keepalive(0x153B088, PG_US, 1)).unwrap(),
            Frame::Keepalive {
                wal_end: Lsn(0x153B088),
                send_time_us: UNIX_US,
                reply_requested: true,
            }
        );
        assert_eq!(
            parse_frame(keepalive(7, 0, 0)).unwrap(),
            Frame::Keepalive {
                wal_end: Lsn(7),
                send_time_us: PG_EPOCH_OFFSET_US,
                reply_requested: false,
            }
        );
    }

    #[test]
    fn frame_errors() {
        let e = |b: &[u8]| {
            parse_frame(Bytes::copy_from_slice(b))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e(b""), "empty replication CopyData frame");
        assert_eq!(e(b"r"), "unknown replication frame tag 0x72");
        assert_eq!(
            e(&xlogdata(1, 2, 3, b"")[..24]),
            "truncated XLogData message at offset 1: need 24 bytes, have 23"
        );
        assert_eq!(
            e(&keepalive(1, 2, 0)[..17]),
            "truncated Keepalive message at offset 1: need 17 bytes, have 16"
        );
        let mut long = keepalive(1, 2, 0).to_vec();
        long.push(0);
        assert_eq!(
            e(&long),
            "1 trailing bytes after Keepalive message at offset 18"
        );
        // Every strict prefix of a frame header is an error.
        for frame in [xlogdata(1, 2, 3, b""), keepalive(1, 2, 1)] {
            for len in 0..frame.len() {
                assert!(parse_frame(frame.slice(..len)).is_err(), "prefix {len}");
            }
        }
    }

    #[test]
    fn status_update_layout() {
        let b = encode_status_update(
            Lsn(0x0102_0304_0506_0708),
            Lsn(0x1112_1314_1516_1718),
            Lsn(0x2122_2324_2526_2728),
            UNIX_US,
            true,
        );
        let mut want = vec![b'r'];
        want.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        want.extend([0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        want.extend([0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]);
        want.extend(PG_US.to_be_bytes());
        want.push(1);
        assert_eq!(b.len(), 34);
        assert_eq!(&b[..], &want[..]);

        // The Unix epoch is before PostgreSQL's: a negative PG clock.
        let b = encode_status_update(Lsn(0), Lsn(0), Lsn(0), 0, false);
        assert_eq!(&b[25..33], &(-PG_EPOCH_OFFSET_US).to_be_bytes());
        assert_eq!(b[33], 0);
    }

    /// Read a status update back (the server's side of the exchange).
    fn parse_status_update(b: &[u8]) -> (u8, u64, u64, u64, i64, u8) {
        let int = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        (b[0], int(1), int(9), int(17), int(25) as i64, b[33])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(Frame::XLogData { payload, .. }) = parse_frame(Bytes::from(bytes)) {
                let _ = decode(payload);
            }
        }

        #[test]
        fn arbitrary_bodies_after_frame_tags_never_panic(
            tag in prop::sample::select(&b"wkr"[..]),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut v = vec![tag];
            v.extend(body);
            if let Ok(Frame::XLogData { payload, .. }) = parse_frame(Bytes::from(v)) {
                let _ = decode(payload);
            }
        }

        #[test]
        fn xlogdata_round_trip(
            start in any::<u64>(),
            end in any::<u64>(),
            pg_time in -(1_i64 << 62)..(1_i64 << 62),
            which in any::<prop::sample::Index>(),
        ) {
            let msg = &text_fixture()[which.index(text_fixture().len())].bytes;
            let f = parse_frame(xlogdata(start, end, pg_time, msg)).unwrap();
            prop_assert_eq!(f, Frame::XLogData {
                start_lsn: Lsn(start),
                end_lsn: Lsn(end),
                send_time_us: pg_time + PG_EPOCH_OFFSET_US,
                payload: msg.clone(),
            });
        }

        #[test]
        fn keepalive_round_trip(wal_end in any::<u64>(), pg_time in -(1_i64 << 62)..(1_i64 << 62), reply in any::<bool>()) {
            let f = parse_frame(keepalive(wal_end, pg_time, u8::from(reply))).unwrap();
            prop_assert_eq!(f, Frame::Keepalive {
                wal_end: Lsn(wal_end),
                send_time_us: pg_time + PG_EPOCH_OFFSET_US,
                reply_requested: reply,
            });
        }

        #[test]
        fn status_update_round_trip(
            w in any::<u64>(), f in any::<u64>(), a in any::<u64>(),
            now in -(1_i64 << 62)..(1_i64 << 62), reply in any::<bool>(),
        ) {
            let b = encode_status_update(Lsn(w), Lsn(f), Lsn(a), now, reply);
            prop_assert_eq!(b.len(), STATUS_UPDATE_LEN);
            prop_assert_eq!(
                parse_status_update(&b),
                (b'r', w, f, a, now - PG_EPOCH_OFFSET_US, u8::from(reply))
            );
        }

        #[test]
        fn xlogdata_wrapping_mutated_messages_never_panic(
            which in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut frame = xlogdata(1, 2, 3, &text_fixture()[which.index(text_fixture().len())].bytes).to_vec();
            for (at, byte) in flips {
                let i = at.index(frame.len());
                frame[i] = byte;
            }
            frame.truncate(cut.index(frame.len() + 1));
            if let Ok(Frame::XLogData { payload, .. }) = parse_frame(Bytes::from(frame)) {
                let _ = decode(payload);
            }
        }
    }

    #[test]
    fn decode_of_encoded_message_inside_a_frame() {
        let m = Message::Truncate {
            options: 3,
            rels: vec![1, 2],
        };
        let frame = xlogdata(10, 20, 0, &encode(&m));
        let Frame::XLogData { payload, .. } = parse_frame(frame).unwrap() else {
            panic!()
        };
        assert_eq!(decode(payload).unwrap(), m);
    }
}
