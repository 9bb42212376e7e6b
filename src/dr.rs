//! Encrypted disaster-recovery copies of data that may not leave its region
//! (pure: no IO).
//!
//! A table may name DR regions (`dr = ["us"]`). Each change of it is then
//! also sent, sealed, to `{prefix}.dr.{home}.{dr}`. The DR region stores the
//! sealed records in `pgrelay_dr.vault` and holds no key: it can neither
//! read a value nor tell which row or table a record belongs to. Only the
//! home region's `dr_key` opens them, with `pgrelay dr restore`.
//!
//! - sealing: AES-256-GCM, a random 12-byte nonce per record; the
//!   associated data binds everything the record shows in clear: the key
//!   id, the home region, the table, the row's hash and the stamp. A record
//!   moved to another table or row, relabelled with another key id or home,
//!   or re-stamped (to win over newer copies in the vault) fails to open;
//! - the record key: HMAC-SHA-256 of the table and the row's encoded primary
//!   key under a key derived from the DR key, so one row's copies replace
//!   each other in the vault and nothing of the key is readable;
//! - in clear: the key id, the nonce, a keyed hash of the table name and
//!   the stamp (the vault keeps the newest copy of each row).
//!
//! The vault cannot check a seal (it holds no key): it refuses what no
//! genuine record can be ([`Sealed::vault_check`]: a stamp out of range or
//! too far ahead, malformed fields), and `dr restore` opens each copy and
//! checks that the row and stamp inside are the vault row's.
//!
//! Records sealed before the associated data bound row and stamp
//! ([`Format::V1`]: key id and table only) still open; their row and stamp
//! are checked against the sealed plaintext, which is what makes a
//! re-stamped old record fail there too.

use crate::hlc::Hlc;
use hmac::{Hmac, Mac};
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What `pgrelay setup` creates where DR copies are used: the vault holds
/// the newest sealed copy of each row of each home region; nothing in it is
/// readable without the home's key. Its consumer's offsets live in
/// `pgrelay.offsets`, like the apply side's.
pub const SETUP_SQL: [&str; 3] = [
    "CREATE SCHEMA IF NOT EXISTS pgrelay_dr",
    "CREATE TABLE IF NOT EXISTS pgrelay_dr.vault (\
        home text NOT NULL, table_hash text NOT NULL, key_hash bytea NOT NULL, \
        stamp bigint NOT NULL, key_id text NOT NULL, nonce bytea NOT NULL, \
        ciphertext bytea NOT NULL, stored_at timestamptz NOT NULL DEFAULT now(), \
        PRIMARY KEY (home, key_hash))",
    // in the sealing region: how many records each DR key sealed (counted
    // ahead, in blocks), so the capture side warns before a key is worn
    "CREATE TABLE IF NOT EXISTS pgrelay_dr.seals (\
        fingerprint text PRIMARY KEY, key_id text NOT NULL, seals bigint NOT NULL, \
        first_sealed timestamptz NOT NULL DEFAULT now(), \
        updated_at timestamptz NOT NULL DEFAULT now())",
];

/// Length of a DR key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A region's DR key and its id, ready to seal and open records.
#[derive(Clone)]
pub struct DrKey {
    id: String,
    key: [u8; KEY_LEN],
    /// HMAC key of record keys and table hashes, derived from `key` so the
    /// secret used for sealing never keys a hash.
    hash_key: [u8; 32],
}

impl std::fmt::Debug for DrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A sealed record as it travels and as the vault stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub key_id: String,
    /// Hex of the keyed hash of the table name.
    pub table_hash: String,
    pub stamp: Hlc,
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DrError {
    #[error("DR key must be {KEY_LEN} bytes as 64 hex digits or base64, got {0}")]
    KeyFormat(String),
    #[error("record sealed with DR key id {found}, this region's key is {expected}")]
    WrongKeyId { found: String, expected: String },
    #[error(
        "sealed with DR key id {0}, which is neither this region's dr_key_id nor in its \
         dr_old_keys: give that key in dr_old_keys"
    )]
    UnknownKeyId(String),
    #[error(
        "does not open with DR key {0}: altered in the vault or on the DR topic (its row, stamp, \
         table or home relabelled), or sealed with another key under that id"
    )]
    Open(String),
    #[error("malformed DR record: {0}")]
    Format(String),
    #[error("sealing failed: {0}")]
    Seal(String),
}

impl DrKey {
    /// Parses a key given as 64 hex digits or as base64 of 32 bytes.
    pub fn parse(id: &str, text: &str) -> Result<DrKey, DrError> {
        let text = text.trim();
        let bytes = if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex_bytes::decode(text).map_err(DrError::KeyFormat)?
        } else {
            base64_decode(text)
                .ok_or_else(|| DrError::KeyFormat("neither hex nor base64".into()))?
        };
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| DrError::KeyFormat(format!("{} bytes", bytes.len())))?;
        let hash_key = hmac(&key, &[b"pgrelay dr record key"]);
        Ok(DrKey {
            id: id.to_string(),
            key,
            hash_key,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The vault key of one row: keyed hash of the table and its encoded
    /// primary key.
    pub fn row_hash(&self, table: &str, key: &[u8]) -> [u8; 32] {
        hmac(&self.hash_key, &[b"row\0", table.as_bytes(), b"\0", key])
    }

    /// The keyed hash of a table name, hex.
    pub fn table_hash(&self, table: &str) -> String {
        hex_bytes::encode(&hmac(&self.hash_key, &[b"table\0", table.as_bytes()])[..16])
    }

    /// A short keyed fingerprint of the key (hex), which names it where
    /// its seals are counted without revealing anything of it; a key id
    /// reused for another key gets another fingerprint.
    pub fn fingerprint(&self) -> String {
        hex_bytes::encode(&hmac(&self.key, &[b"pgrelay dr key fingerprint"])[..8])
    }

    /// Seals `plaintext` (the whole change) of row `row` (its
    /// [`DrKey::row_hash`]) of `table`, written in `home` and stamped
    /// `stamp`, with a fresh nonce.
    pub fn seal(
        &self,
        home: &str,
        table: &str,
        row: &[u8; 32],
        stamp: Hlc,
        plaintext: &[u8],
    ) -> Result<Sealed, DrError> {
        let mut nonce = [0u8; NONCE_LEN];
        openssl::rand::rand_bytes(&mut nonce).map_err(|e| DrError::Seal(e.to_string()))?;
        let mut tag = [0u8; TAG_LEN];
        let aad = Format::V2.aad(&self.id, home, table, row, stamp);
        let mut ciphertext = encrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(&nonce),
            &aad,
            plaintext,
            &mut tag,
        )
        .map_err(|e| DrError::Seal(e.to_string()))?;
        ciphertext.extend_from_slice(&tag);
        Ok(Sealed {
            key_id: self.id.clone(),
            table_hash: self.table_hash(table),
            stamp,
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a sealed copy of row `row` of `table` written in `home`, as
    /// the vault holds it; fails on another key id, home, table, row or
    /// stamp, another key or any changed byte. Says which format opened.
    pub fn open(
        &self,
        home: &str,
        table: &str,
        row: &[u8],
        sealed: &Sealed,
    ) -> Result<(Vec<u8>, Format), DrError> {
        if sealed.key_id != self.id {
            return Err(DrError::WrongKeyId {
                found: sealed.key_id.clone(),
                expected: self.id.clone(),
            });
        }
        if sealed.nonce.len() != NONCE_LEN || sealed.ciphertext.len() < TAG_LEN {
            return Err(DrError::Format("nonce or ciphertext too short".into()));
        }
        let (body, tag) = sealed
            .ciphertext
            .split_at(sealed.ciphertext.len() - TAG_LEN);
        for format in [Format::V2, Format::V1] {
            let aad = format.aad(&self.id, home, table, row, sealed.stamp);
            if let Ok(plain) = decrypt_aead(
                Cipher::aes_256_gcm(),
                &self.key,
                Some(&sealed.nonce),
                &aad,
                body,
                tag,
            ) {
                return Ok((plain, format));
            }
        }
        Err(DrError::Open(self.id.clone()))
    }
}

/// The associated data a record was sealed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Key id and table only (records sealed by earlier releases): the
    /// row and stamp are checked against the plaintext after opening.
    V1,
    /// Key id, home, table, row hash and stamp.
    V2,
}

impl Format {
    fn aad(self, key_id: &str, home: &str, table: &str, row: &[u8], stamp: Hlc) -> Vec<u8> {
        let mut aad = Vec::with_capacity(64 + key_id.len() + home.len() + table.len());
        if self == Format::V2 {
            aad.extend_from_slice(b"pgrelay dr v2\0");
        }
        aad.extend_from_slice(key_id.as_bytes());
        aad.push(0);
        if self == Format::V1 {
            aad.extend_from_slice(table.as_bytes());
            return aad;
        }
        aad.extend_from_slice(home.as_bytes());
        aad.push(0);
        aad.extend_from_slice(table.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&(row.len() as u32).to_be_bytes());
        aad.extend_from_slice(row);
        aad.extend_from_slice(&stamp.get().to_be_bytes());
        aad
    }
}

/// The DR keys of a region: the one it seals with and the ones it sealed
/// with before a rotation (`dr_old_keys`), which `dr restore` still opens.
#[derive(Clone, Debug)]
pub struct KeyRing {
    pub current: DrKey,
    pub old: Vec<DrKey>,
}

impl KeyRing {
    /// The key with id `id`, if the ring holds it.
    pub fn get(&self, id: &str) -> Option<&DrKey> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .find(|k| k.id == id)
    }

    /// Every key, the current one first.
    pub fn keys(&self) -> impl Iterator<Item = &DrKey> {
        std::iter::once(&self.current).chain(&self.old)
    }
}

/// Seals under one key after which `capture` warns that the key is due for
/// rotation: AES-GCM with random 12-byte nonces stays within its safety
/// margin (nonce collision probability below 2^-32) up to about 2^32
/// messages per key.
pub const SEALS_WARN: u64 = 1 << 31;

/// Why the vault refuses a record (see [`Sealed::vault_check`]); the
/// metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    StampOutOfRange,
    StampAhead,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::StampOutOfRange => "stamp_out_of_range",
            Refusal::StampAhead => "stamp_ahead",
        }
    }
}

impl Sealed {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("sealed record serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Sealed, DrError> {
        serde_json::from_slice(bytes).map_err(|e| DrError::Format(e.to_string()))
    }

    /// What the vault, which holds no key, can check of a record with
    /// record key `row`: that it could be genuine. A stamp beyond what a
    /// `bigint` holds, or more than `max_ahead_ms` ahead of `now_ms`, is no
    /// stamp any region made (and a far-future one would keep every later
    /// copy of its row out of the vault).
    pub fn vault_check(&self, row: &[u8], now_ms: u64, max_ahead_ms: u64) -> Result<(), Refusal> {
        let id_ok = !self.key_id.is_empty()
            && self.key_id.len() <= 16
            && self
                .key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let table_ok =
            self.table_hash.len() == 32 && self.table_hash.bytes().all(|b| b.is_ascii_hexdigit());
        if row.len() != 32
            || !id_ok
            || !table_ok
            || self.nonce.len() != NONCE_LEN
            || self.ciphertext.len() < TAG_LEN
        {
            return Err(Refusal::Malformed);
        }
        if self.stamp.get() > i64::MAX as u64 {
            return Err(Refusal::StampOutOfRange);
        }
        if self.stamp.ahead_ms(now_ms) > max_ahead_ms.min(i64::MAX as u64) as i64 {
            return Err(Refusal::StampAhead);
        }
        Ok(())
    }
}

/// What a sealed record holds: the live topic's record key and value of the
/// whole row change (every column, no column rule applied), so `dr restore`
/// applies it like the apply side applies a live record.
pub fn plaintext(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len() + value.len());
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

/// The record key and value of an opened record (see [`plaintext`]).
pub fn split_plaintext(plain: &[u8]) -> Result<(&[u8], &[u8]), DrError> {
    let len = plain
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| DrError::Format("plaintext too short".into()))?;
    let rest = &plain[4..];
    if rest.len() < len {
        return Err(DrError::Format("plaintext key length past its end".into()));
    }
    Ok(rest.split_at(len))
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn encode(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn decode(text: &str) -> Result<Vec<u8>, String> {
        if text.len() % 2 != 0 {
            return Err("odd number of hex digits".into());
        }
        (0..text.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16)
                    .map_err(|_| "not hex".to_string())
            })
            .collect()
    }

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        decode(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn key(id: &str) -> DrKey {
        DrKey::parse(id, HEX).unwrap()
    }

    const ROW: [u8; 32] = [7; 32];

    fn seal(k: &DrKey, table: &str, stamp: u64, plain: &[u8]) -> Sealed {
        k.seal("eu", table, &ROW, Hlc::new(stamp), plain).unwrap()
    }

    /// A record as releases before [`Format::V2`] sealed it.
    fn seal_v1(k: &DrKey, table: &str, stamp: u64, plain: &[u8]) -> Sealed {
        let stamp = Hlc::new(stamp);
        let nonce = [3u8; NONCE_LEN];
        let mut tag = [0u8; TAG_LEN];
        let aad = Format::V1.aad(&k.id, "ignored", table, &[], stamp);
        let mut ciphertext = encrypt_aead(
            Cipher::aes_256_gcm(),
            &k.key,
            Some(&nonce),
            &aad,
            plain,
            &mut tag,
        )
        .unwrap();
        ciphertext.extend_from_slice(&tag);
        Sealed {
            key_id: k.id.clone(),
            table_hash: k.table_hash(table),
            stamp,
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    #[test]
    fn seal_then_open_round_trips_and_hides_the_plaintext() {
        let k = key("k1");
        let plain = br#"{"after":{"email":"MARKER-alice@example.eu"}}"#;
        let sealed = seal(&k, "public.users", 42, plain);
        let wire = sealed.encode();
        assert!(!String::from_utf8_lossy(&wire).contains("MARKER"));
        assert!(!String::from_utf8_lossy(&wire).contains("users"));
        let back = Sealed::decode(&wire).unwrap();
        assert_eq!(back.stamp, Hlc::new(42));
        assert_eq!(
            k.open("eu", "public.users", &ROW, &back).unwrap(),
            (plain.to_vec(), Format::V2)
        );
    }

    #[test]
    fn plaintext_splits_back() {
        let p = plaintext(b"{\"k\":1}", b"{\"after\":{}}");
        assert_eq!(
            split_plaintext(&p).unwrap(),
            (&b"{\"k\":1}"[..], &b"{\"after\":{}}"[..])
        );
        assert!(split_plaintext(&p[..6]).is_err());
        assert!(split_plaintext(b"ab").is_err());
    }

    #[test]
    fn nonces_differ_per_record() {
        let k = key("k1");
        let a = seal(&k, "t", 1, b"same");
        let b = seal(&k, "t", 1, b"same");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn tampering_is_detected() {
        let k = key("k1");
        let open = |home: &str, table: &str, row: &[u8], s: &Sealed| {
            k.open(home, table, row, s).map(|(p, _)| p)
        };
        let sealed = seal(&k, "public.users", 1, b"payload");
        let refused = Err(DrError::Open("k1".into()));
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 1;
            assert_eq!(open("eu", "public.users", &ROW, &bad), refused, "byte {i}");
        }
        let mut bad = sealed.clone();
        bad.nonce[0] ^= 1;
        assert_eq!(open("eu", "public.users", &ROW, &bad), refused);
        // moved to another table, row or home: the associated data differs
        assert_eq!(open("eu", "public.orders", &ROW, &sealed), refused);
        assert_eq!(open("eu", "public.users", &[8; 32], &sealed), refused);
        assert_eq!(open("us", "public.users", &ROW, &sealed), refused);
        // re-stamped to win over newer copies, by a little or by a lot
        for stamp in [2, 1 + (600_000 << 16), u64::MAX] {
            let mut restamped = sealed.clone();
            restamped.stamp = Hlc::new(stamp);
            assert_eq!(open("eu", "public.users", &ROW, &restamped), refused);
        }
    }

    #[test]
    fn records_sealed_before_rows_and_stamps_were_bound_still_open() {
        let k = key("k1");
        let old = seal_v1(&k, "public.users", 5, b"payload");
        assert_eq!(
            k.open("eu", "public.users", &ROW, &old).unwrap(),
            (b"payload".to_vec(), Format::V1)
        );
        assert!(k.open("eu", "public.orders", &ROW, &old).is_err());
        let mut bad = old.clone();
        bad.ciphertext[0] ^= 1;
        assert!(k.open("eu", "public.users", &ROW, &bad).is_err());
    }

    #[test]
    fn wrong_key_id_and_wrong_key_are_refused() {
        let sealed = seal(&key("k1"), "t", 1, b"payload");
        assert!(matches!(
            key("k2").open("eu", "t", &ROW, &sealed),
            Err(DrError::WrongKeyId { .. })
        ));
        // relabelled with the other id: the associated data no longer matches
        let mut relabelled = sealed.clone();
        relabelled.key_id = "k2".into();
        assert_eq!(
            key("k2").open("eu", "t", &ROW, &relabelled),
            Err(DrError::Open("k2".into()))
        );
        let other = DrKey::parse("k1", &"ab".repeat(32)).unwrap();
        assert!(other.open("eu", "t", &ROW, &sealed).is_err());
        assert_ne!(other.fingerprint(), key("k1").fingerprint());
        assert_eq!(key("k2").fingerprint(), key("k1").fingerprint());
    }

    #[test]
    fn a_key_ring_finds_keys_by_id() {
        let ring = KeyRing {
            current: key("k2"),
            old: vec![DrKey::parse("k1", &"ab".repeat(32)).unwrap()],
        };
        assert_eq!(ring.get("k2").unwrap().id(), "k2");
        assert_eq!(ring.get("k1").unwrap().id(), "k1");
        assert!(ring.get("k0").is_none());
        assert_eq!(ring.keys().count(), 2);
    }

    #[test]
    fn the_vault_refuses_what_no_region_sealed() {
        let k = key("k1");
        let now_ms = 1_800_000_000_000;
        let stamp = Hlc::compose(now_ms, 0, 1);
        let good = seal(&k, "t", stamp.get(), b"x");
        assert_eq!(good.vault_check(&ROW, now_ms, 300_000), Ok(()));
        let with_stamp = |stamp: u64| Sealed {
            stamp: Hlc::new(stamp),
            ..good.clone()
        };
        assert_eq!(with_stamp(0).vault_check(&ROW, now_ms, 300_000), Ok(()));
        assert_eq!(
            with_stamp(u64::MAX).vault_check(&ROW, now_ms, 300_000),
            Err(Refusal::StampOutOfRange)
        );
        assert_eq!(
            with_stamp(Hlc::compose(now_ms + 600_000, 0, 1).get())
                .vault_check(&ROW, now_ms, 300_000),
            Err(Refusal::StampAhead)
        );
        assert_eq!(
            good.vault_check(b"short", now_ms, 300_000),
            Err(Refusal::Malformed)
        );
        let mut bad = good.clone();
        bad.nonce.pop();
        assert_eq!(
            bad.vault_check(&ROW, now_ms, 300_000),
            Err(Refusal::Malformed)
        );
        let mut bad = good.clone();
        bad.key_id = "no spaces".into();
        assert_eq!(
            bad.vault_check(&ROW, now_ms, 300_000),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn keys_parse_from_hex_or_base64_and_must_be_32_bytes() {
        let b64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let a = DrKey::parse("k", HEX).unwrap();
        let b = DrKey::parse("k", b64).unwrap();
        assert_eq!(a.key, b.key);
        assert!(DrKey::parse("k", "abcd").is_err());
        assert!(DrKey::parse("k", "not a key!").is_err());
        assert!(format!("{a:?}").find("key:").is_none());
    }

    #[test]
    fn row_hash_is_keyed_and_separates_tables() {
        let k = key("k1");
        assert_eq!(k.row_hash("t", b"1"), k.row_hash("t", b"1"));
        assert_ne!(k.row_hash("t", b"1"), k.row_hash("u", b"1"));
        let other = DrKey::parse("k1", &"ab".repeat(32)).unwrap();
        assert_ne!(k.row_hash("t", b"1"), other.row_hash("t", b"1"));
    }
}
