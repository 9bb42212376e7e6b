//! Encrypted disaster-recovery copies of data that may not leave its region
//! (pure: no IO).
//!
//! A table may name DR regions (`dr = ["us"]`). Each change of it is then
//! also sent, sealed, to `{prefix}.dr.{home}.{dr}`. The DR region stores the
//! sealed records in `pgrelay_dr.vault` and holds no key: it can neither
//! read a value nor tell which row or table a record belongs to. Only the
//! home region's `dr_key` opens them, with `pgrelay dr restore`.
//!
//! - sealing: AES-256-GCM, a random 12-byte nonce per record, the key id and
//!   the table name as associated data (a record moved to another table, or
//!   relabelled with another key id, fails to open);
//! - the record key: HMAC-SHA-256 of the table and the row's encoded primary
//!   key under a key derived from the DR key, so one row's copies replace
//!   each other in the vault and nothing of the key is readable;
//! - in clear: the key id, the nonce, a keyed hash of the table name and
//!   the stamp (the vault keeps the newest copy of each row).

use hmac::{Hmac, Mac};
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What `pgrelay setup` creates where DR copies are used: the vault holds
/// the newest sealed copy of each row of each home region; nothing in it is
/// readable without the home's key. Its consumer's offsets live in
/// `pgrelay.offsets`, like the apply side's.
pub const SETUP_SQL: [&str; 2] = [
    "CREATE SCHEMA IF NOT EXISTS pgrelay_dr",
    "CREATE TABLE IF NOT EXISTS pgrelay_dr.vault (\
        home text NOT NULL, table_hash text NOT NULL, key_hash bytea NOT NULL, \
        stamp bigint NOT NULL, key_id text NOT NULL, nonce bytea NOT NULL, \
        ciphertext bytea NOT NULL, stored_at timestamptz NOT NULL DEFAULT now(), \
        PRIMARY KEY (home, key_hash))",
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
    pub stamp: u64,
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
    #[error("record does not open with this DR key (tampered, or another key)")]
    Open,
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

    /// Seals `plaintext` (the whole change) of `table` with a fresh nonce.
    pub fn seal(&self, table: &str, stamp: u64, plaintext: &[u8]) -> Result<Sealed, DrError> {
        let mut nonce = [0u8; NONCE_LEN];
        openssl::rand::rand_bytes(&mut nonce).map_err(|e| DrError::Seal(e.to_string()))?;
        let mut tag = [0u8; TAG_LEN];
        let aad = aad(&self.id, table);
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

    /// Opens a sealed record of `table`; fails on another key id, another
    /// table, another key or any changed byte.
    pub fn open(&self, table: &str, sealed: &Sealed) -> Result<Vec<u8>, DrError> {
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
        decrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(&sealed.nonce),
            &aad(&self.id, table),
            body,
            tag,
        )
        .map_err(|_| DrError::Open)
    }
}

impl Sealed {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("sealed record serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Sealed, DrError> {
        serde_json::from_slice(bytes).map_err(|e| DrError::Format(e.to_string()))
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

fn aad(key_id: &str, table: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(key_id.len() + table.len() + 1);
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(table.as_bytes());
    aad
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

    #[test]
    fn seal_then_open_round_trips_and_hides_the_plaintext() {
        let k = key("k1");
        let plain = br#"{"after":{"email":"MARKER-alice@example.eu"}}"#;
        let sealed = k.seal("public.users", 42, plain).unwrap();
        let wire = sealed.encode();
        assert!(!String::from_utf8_lossy(&wire).contains("MARKER"));
        assert!(!String::from_utf8_lossy(&wire).contains("users"));
        let back = Sealed::decode(&wire).unwrap();
        assert_eq!(back.stamp, 42);
        assert_eq!(k.open("public.users", &back).unwrap(), plain);
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
        let a = k.seal("t", 1, b"same").unwrap();
        let b = k.seal("t", 1, b"same").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn tampering_is_detected() {
        let k = key("k1");
        let sealed = k.seal("public.users", 1, b"payload").unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 1;
            assert_eq!(k.open("public.users", &bad), Err(DrError::Open), "byte {i}");
        }
        let mut bad = sealed.clone();
        bad.nonce[0] ^= 1;
        assert_eq!(k.open("public.users", &bad), Err(DrError::Open));
        // moved to another table: the associated data differs
        assert_eq!(k.open("public.orders", &sealed), Err(DrError::Open));
    }

    #[test]
    fn wrong_key_id_and_wrong_key_are_refused() {
        let sealed = key("k1").seal("t", 1, b"payload").unwrap();
        assert!(matches!(
            key("k2").open("t", &sealed),
            Err(DrError::WrongKeyId { .. })
        ));
        // relabelled with the other id: the associated data no longer matches
        let mut relabelled = sealed.clone();
        relabelled.key_id = "k2".into();
        assert_eq!(key("k2").open("t", &relabelled), Err(DrError::Open));
        let other = DrKey::parse("k1", &"ab".repeat(32)).unwrap();
        assert_eq!(other.open("t", &sealed), Err(DrError::Open));
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
