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

fn params(dsn: &str) -> ConnParams {
    ConnParams::from_dsn(dsn, "pgrelay").unwrap()
}

/// An authentication message's body: the code, then `rest`.
fn auth(code: i32, rest: &[u8]) -> Bytes {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(rest);
    Bytes::from(b)
}

#[test]
fn trust_needs_no_answer() {
    let p = params("host=db user=relay sslmode=disable");
    let mut a = Authentication::new(&p, None, false);
    assert!(a.answer(auth(0, b"")).unwrap().is_none());
    assert!(matches!(
        a.answer(Bytes::from_static(&[0, 0])),
        Err(ConnError::Protocol(_))
    ));
}

#[test]
fn passwords_go_in_clear_only_when_tls_is_off_or_the_session_encrypted() {
    let p = params("host=db user=relay password=pw sslmode=disable");
    let out = Authentication::new(&p, None, false)
        .answer(auth(3, b""))
        .unwrap()
        .unwrap();
    assert_eq!(out[0], b'p');
    assert!(out.ends_with(b"pw\0"));
    let p = params("host=db user=relay password=pw sslmode=prefer");
    for code in [3, 5] {
        let e = Authentication::new(&p, None, false)
            .answer(auth(code, &[1, 2, 3, 4]))
            .unwrap_err();
        assert!(matches!(e, ConnError::InsecureAuth(_)), "{e:?}");
        // over TLS, the same request is answered
        let out = Authentication::new(&p, Some(vec![7; 32]), true)
            .answer(auth(code, &[1, 2, 3, 4]))
            .unwrap();
        assert!(out.is_some());
    }
}

#[test]
fn md5_answers_the_salted_hash() {
    let p = params("host=db user=relay password=pw sslmode=disable");
    let out = Authentication::new(&p, None, false)
        .answer(auth(5, &[1, 2, 3, 4]))
        .unwrap()
        .unwrap();
    let hash = md5_hash(b"relay", b"pw", [1, 2, 3, 4]);
    assert!(out.ends_with(format!("{hash}\0").as_bytes()));
    let e = Authentication::new(&p, None, false)
        .answer(auth(5, &[1, 2]))
        .unwrap_err();
    assert!(matches!(e, ConnError::Protocol(_)), "{e:?}");
}

#[test]
fn a_password_request_without_a_password_is_an_auth_error() {
    let p = params("host=db user=relay sslmode=disable");
    let e = Authentication::new(&p, None, false)
        .answer(auth(3, b""))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "authentication failed: the server asks user \"relay\" for a password and the DSN has none"
    );
}

#[test]
fn scram_binds_the_channel_when_it_can() {
    let mechanisms = |names: &[&str]| {
        let mut b = Vec::new();
        for n in names {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    };
    let both = mechanisms(&[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
    let first = |p: &ConnParams, binding: Option<Vec<u8>>, encrypted: bool| {
        let mut a = Authentication::new(p, binding, encrypted);
        let out = a.answer(auth(10, &both)).map(|o| o.unwrap());
        (out, a.chose_plus)
    };
    let p = params("host=db user=relay password=pw sslmode=require");
    // over TLS with PLUS offered: bound to the channel
    let (out, plus) = first(&p, Some(vec![7; 32]), true);
    let out = out.unwrap();
    assert!(plus);
    assert!(out.windows(5).any(|w| w == b"p=tls"), "{out:?}");
    // no PLUS offered over TLS: the client says it could have bound
    let mut a = Authentication::new(&p, Some(vec![7; 32]), true);
    let out = a
        .answer(auth(10, &mechanisms(&[SCRAM_SHA_256])))
        .unwrap()
        .unwrap();
    assert!(!a.chose_plus);
    assert!(out.windows(4).any(|w| w == b"y,,n"), "{out:?}");
    // unencrypted: no binding at all
    let p = params("host=db user=relay password=pw sslmode=disable");
    let (out, plus) = first(&p, None, false);
    assert!(!plus);
    assert!(out.unwrap().windows(4).any(|w| w == b"n,,n"));
    // channel_binding=require refuses what cannot bind
    let p = params("host=db user=relay password=pw sslmode=disable channel_binding=require");
    let (out, _) = first(&p, None, false);
    assert!(out
        .unwrap_err()
        .to_string()
        .contains("no SCRAM-SHA-256-PLUS"));
    let e = Authentication::new(&p, None, false)
        .answer(auth(0, b""))
        .unwrap_err();
    assert!(e
        .to_string()
        .contains("authenticated without channel binding"));
    // SASL continue before SASL start
    let e = Authentication::new(&p, None, false)
        .answer(auth(11, b"r=x"))
        .unwrap_err();
    assert!(matches!(e, ConnError::Protocol(_)), "{e:?}");
}
