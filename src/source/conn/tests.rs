use super::*;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[test]
fn buffered_messages_are_taken_whole_and_only_whole() {
    let mut bytes = message(b'd', b"one");
    bytes.extend(message(b'd', b"two"));
    let third = message(b'c', b"");
    bytes.extend(&third[..3]);
    let mut r = FrameReader::new(&[][..]);
    r.buf.extend_from_slice(&bytes);
    assert_eq!(r.buffered_tag().unwrap(), Some(b'd'));
    assert_eq!(r.take_buffered().unwrap().1.as_ref(), b"one");
    assert_eq!(r.take_buffered().unwrap().1.as_ref(), b"two");
    // a partial message stays buffered
    assert_eq!(r.buffered_tag().unwrap(), None);
    assert!(r.take_buffered().is_none());
    r.buf.extend_from_slice(&third[3..]);
    assert_eq!(r.buffered_tag().unwrap(), Some(b'c'));
    r.buf.clear();
    r.buf.extend_from_slice(&[b'd', 0, 0, 0, 1]);
    assert!(r.buffered_tag().is_err(), "length below 4 is rejected");
}

#[test]
fn server_error_fields() {
    let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
    match server_error(body) {
        ConnError::Server { code, message } => {
            assert_eq!(code, "42704");
            assert_eq!(message, "replication slot \"x\" does not exist");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn data_row_nulls_and_values() {
    let mut b = BytesMut::new();
    b.extend_from_slice(&2i16.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&3i32.to_be_bytes());
    b.extend_from_slice(b"abc");
    let row = parse_data_row(b.freeze()).unwrap();
    assert_eq!(row, vec![None, Some("abc".to_string())]);
    assert!(parse_data_row(Bytes::from_static(&[0, 1, 0, 0, 0, 9])).is_err());
}

#[test]
fn dsn_parsing_keeps_password_out_of_debug() {
    let p = ConnParams::from_dsn(
        "host=127.0.0.1 port=5999 user=relay password=s3cret dbname=app",
        "pgrelay",
    )
    .unwrap();
    assert_eq!(p.port, 5999);
    assert_eq!(p.dbname, "app");
    assert!(!format!("{p:?}").contains("s3cret"));
}
