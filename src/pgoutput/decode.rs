//! Decoding of single `pgoutput` messages (logical replication protocol
//! version 1), as carried in the payload of an `XLogData` frame.
//!
//! Layouts (all integers big-endian, strings NUL-terminated):
//!
//! ```text
//! 'B' final_lsn:i64 commit_ts:i64 xid:i32
//! 'C' flags:i8 commit_lsn:i64 end_lsn:i64 commit_ts:i64
//! 'O' origin_lsn:i64 name:str
//! 'R' oid:i32 schema:str name:str replica_identity:i8 ncols:i16
//!     { flags:i8 name:str type_oid:i32 type_mod:i32 } * ncols
//! 'Y' oid:i32 schema:str name:str
//! 'I' oid:i32 'N' tuple
//! 'U' oid:i32 [('K' | 'O') tuple] 'N' tuple
//! 'D' oid:i32 ('K' | 'O') tuple
//! 'T' nrels:i32 options:i8 oid:i32 * nrels
//! 'M' flags:i8 lsn:i64 prefix:str len:i32 content:len bytes
//!
//! tuple = ncols:i16 { 'n' | 'u' | ('t' | 'b') len:i32 value:len bytes } * ncols
//! ```

use bytes::Bytes;

use crate::event::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
pub(crate) const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// PostgreSQL timestamp (µs since 2000-01-01) to µs since the Unix epoch.
/// Saturates rather than overflowing (PostgreSQL's `infinity` is `i64::MAX`).
pub(crate) fn pg_to_unix_us(pg_us: i64) -> i64 {
    pg_us.saturating_add(PG_EPOCH_OFFSET_US)
}

/// µs since the Unix epoch to a PostgreSQL timestamp (µs since 2000-01-01).
pub(crate) fn unix_to_pg_us(unix_us: i64) -> i64 {
    unix_us.saturating_sub(PG_EPOCH_OFFSET_US)
}

/// Why a buffer could not be decoded. `msg` names the message (or frame)
/// kind being decoded; `offset` is the byte offset, from the start of the
/// buffer given to [`decode`] or [`parse_frame`](super::parse_frame), where
/// the offending item starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty {what}")]
    Empty { what: &'static str },
    #[error("unknown pgoutput message tag {tag:#04x}")]
    UnknownTag { tag: u8 },
    #[error("unknown replication frame tag {tag:#04x}")]
    UnknownFrameTag { tag: u8 },
    #[error("truncated {msg} message at offset {offset}: need {need} bytes, have {have}")]
    Truncated {
        msg: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("unterminated string in {msg} message at offset {offset}")]
    UnterminatedString { msg: &'static str, offset: usize },
    #[error("invalid UTF-8 in string in {msg} message at offset {offset}")]
    InvalidUtf8 { msg: &'static str, offset: usize },
    #[error("negative {field} {value} in {msg} message at offset {offset}")]
    Negative {
        msg: &'static str,
        field: &'static str,
        value: i32,
        offset: usize,
    },
    #[error(
        "unexpected byte {found:#04x} in {msg} message at offset {offset}: expected {expected}"
    )]
    UnexpectedMarker {
        msg: &'static str,
        offset: usize,
        found: u8,
        expected: &'static str,
    },
    #[error("unknown tuple value kind {kind:#04x} in {msg} message at offset {offset}")]
    UnknownValueKind {
        msg: &'static str,
        offset: usize,
        kind: u8,
    },
    #[error("{extra} trailing bytes after {msg} message at offset {offset}")]
    TrailingBytes {
        msg: &'static str,
        offset: usize,
        extra: usize,
    },
}

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `'B'`: start of a transaction. `final_lsn` is the LSN of its commit
    /// record.
    Begin {
        final_lsn: Lsn,
        /// Commit time, µs since the Unix epoch.
        commit_ts_us: i64,
        xid: u32,
    },
    /// `'C'`: end of a transaction. `end_lsn` is where the next transaction
    /// starts: the position to acknowledge once this one is durable.
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        /// Commit time, µs since the Unix epoch.
        commit_ts_us: i64,
    },
    /// `'O'`: the transaction was replayed under a replication origin.
    Origin { origin_lsn: Lsn, name: String },
    /// `'R'`: schema of a relation, sent before its first row change (and
    /// again after the relation changes).
    Relation {
        oid: u32,
        /// Empty for `pg_catalog`.
        schema: String,
        name: String,
        /// `'d'` default, `'n'` nothing, `'f'` full, `'i'` index.
        replica_identity: u8,
        columns: Vec<RelColumn>,
    },
    /// `'Y'`: a non-built-in type referenced by a following Relation.
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    /// `'I'`
    Insert { rel: u32, new: Tuple },
    /// `'U'`: `old` is present when the replica identity changed (`Key`) or
    /// the table has `REPLICA IDENTITY FULL` (`Full`).
    Update {
        rel: u32,
        old: Option<(OldKind, Tuple)>,
        new: Tuple,
    },
    /// `'D'`
    Delete { rel: u32, old: (OldKind, Tuple) },
    /// `'T'`: `options` bit 0 is `CASCADE`, bit 1 `RESTART IDENTITY`.
    Truncate { options: u8, rels: Vec<u32> },
    /// `'M'`: from `pg_logical_emit_message`.
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// One column of a [`Message::Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// Bit 0 set: the column is part of the replica identity (key).
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_mod: i32,
}

impl RelColumn {
    /// Whether this column is part of the replica identity.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Which old row image an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OldKind {
    /// `'K'`: only the replica identity columns are set; others are `Null`.
    Key,
    /// `'O'`: the whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

/// The column values of one row, in relation column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<TupleValue>);

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `'n'`
    Null,
    /// `'u'`: an unchanged TOASTed value the stream did not carry.
    Unchanged,
    /// `'t'`: text output format.
    Text(Bytes),
    /// `'b'`: binary (`send`) format.
    Binary(Bytes),
}

/// Decode one `pgoutput` message (the payload of an `XLogData` frame).
///
/// The returned values share `payload`'s buffer. Any bytes left after a
/// complete message are an error.
pub fn decode(payload: Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = payload.first() else {
        return Err(DecodeError::Empty {
            what: "pgoutput message",
        });
    };
    let msg = match tag {
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
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    let mut r = Reader::new(&payload, msg);
    r.pos = 1;
    let m = match tag {
        b'B' => Message::Begin {
            final_lsn: r.lsn()?,
            commit_ts_us: pg_to_unix_us(r.i64()?),
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_ts_us: pg_to_unix_us(r.i64()?),
        },
        b'O' => Message::Origin {
            origin_lsn: r.lsn()?,
            name: r.string()?,
        },
        b'R' => relation(&mut r)?,
        b'Y' => Message::Type {
            oid: r.u32()?,
            schema: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let rel = r.u32()?;
            r.expect(b'N', "'N'")?;
            Message::Insert {
                rel,
                new: r.tuple()?,
            }
        }
        b'U' => update(&mut r)?,
        b'D' => delete(&mut r)?,
        b'T' => truncate(&mut r)?,
        b'M' => logical_message(&mut r)?,
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish()?;
    Ok(m)
}

/// `'R'`: oid, schema, name, replica identity, then each column's flags,
/// name, type and type modifier.
fn relation(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let oid = r.u32()?;
    let schema = r.string()?;
    let name = r.string()?;
    let replica_identity = r.u8()?;
    let n = r.count16("column count")?;
    // Each column takes at least 10 bytes: don't let a bogus count
    // reserve memory the buffer cannot back.
    let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
    for _ in 0..n {
        columns.push(RelColumn {
            flags: r.u8()?,
            name: r.string()?,
            type_oid: r.u32()?,
            type_mod: r.i32()?,
        });
    }
    Ok(Message::Relation {
        oid,
        schema,
        name,
        replica_identity,
        columns,
    })
}

/// `'U'`: the relation, an optional old tuple (`'K'` key or `'O'` full),
/// then `'N'` and the new tuple.
fn update(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let rel = r.u32()?;
    let at = r.pos;
    let old = match r.u8()? {
        b'N' => None,
        b'K' => Some(OldKind::Key),
        b'O' => Some(OldKind::Full),
        found => return Err(r.unexpected(at, found, "'K', 'O' or 'N'")),
    };
    let old = match old {
        None => None,
        Some(kind) => {
            let tuple = r.tuple()?;
            r.expect(b'N', "'N'")?;
            Some((kind, tuple))
        }
    };
    Ok(Message::Update {
        rel,
        old,
        new: r.tuple()?,
    })
}

/// `'D'`: the relation, then the old tuple (`'K'` key or `'O'` full).
fn delete(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let rel = r.u32()?;
    let at = r.pos;
    let kind = match r.u8()? {
        b'K' => OldKind::Key,
        b'O' => OldKind::Full,
        found => return Err(r.unexpected(at, found, "'K' or 'O'")),
    };
    Ok(Message::Delete {
        rel,
        old: (kind, r.tuple()?),
    })
}

/// `'T'`: the relation count, options, then the relations.
fn truncate(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let n = r.count32("relation count")?;
    let options = r.u8()?;
    // Check the whole array up front so the allocation is backed by
    // the buffer.
    r.need(n.saturating_mul(4))?;
    let mut rels = Vec::with_capacity(n);
    for _ in 0..n {
        rels.push(r.u32()?);
    }
    Ok(Message::Truncate { options, rels })
}

/// `'M'`: flags, LSN, prefix, then the content's length and bytes.
fn logical_message(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let flags = r.u8()?;
    let lsn = r.lsn()?;
    let prefix = r.string()?;
    let len = r.count32("content length")?;
    Ok(Message::LogicalMessage {
        transactional: flags & 1 != 0,
        lsn,
        prefix,
        content: r.take(len)?,
    })
}

/// A bounds-checked cursor over a buffer. Every read checks the remaining
/// length first and reports a [`DecodeError`] instead of panicking.
pub(super) struct Reader<'a> {
    buf: &'a Bytes,
    pub(super) pos: usize,
    msg: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a Bytes, msg: &'static str) -> Self {
        Reader { buf, pos: 0, msg }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, need: usize) -> DecodeError {
        DecodeError::Truncated {
            msg: self.msg,
            offset: self.pos,
            need,
            have: self.remaining(),
        }
    }

    fn unexpected(&self, offset: usize, found: u8, expected: &'static str) -> DecodeError {
        DecodeError::UnexpectedMarker {
            msg: self.msg,
            offset,
            found,
            expected,
        }
    }

    pub(super) fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.remaining() < n {
            Err(self.truncated(n))
        } else {
            Ok(())
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let a = *rest.first_chunk::<N>().ok_or_else(|| self.truncated(N))?;
        self.pos += N;
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(super) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    pub(super) fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array()?)))
    }

    /// A signed 16-bit count that must not be negative.
    fn count16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let v = self.i16()?;
        usize::try_from(v).map_err(|_| self.negative(field, v.into(), at))
    }

    /// A signed 32-bit count or length that must not be negative.
    fn count32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let v = self.i32()?;
        usize::try_from(v).map_err(|_| self.negative(field, v, at))
    }

    fn negative(&self, field: &'static str, value: i32, offset: usize) -> DecodeError {
        DecodeError::Negative {
            msg: self.msg,
            field,
            value,
            offset,
        }
    }

    /// The next `n` bytes, sharing the underlying buffer.
    pub(super) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// All remaining bytes, sharing the underlying buffer.
    pub(super) fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos.min(self.buf.len())..);
        self.pos = self.buf.len();
        b
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let at = self.pos;
        let rest = self.buf.get(at..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                msg: self.msg,
                offset: at,
            });
        };
        let s = std::str::from_utf8(&rest[..len]).map_err(|_| DecodeError::InvalidUtf8 {
            msg: self.msg,
            offset: at,
        })?;
        self.pos = at + len + 1;
        Ok(s.to_owned())
    }

    fn expect(&mut self, want: u8, expected: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        let found = self.u8()?;
        if found == want {
            Ok(())
        } else {
            Err(self.unexpected(at, found, expected))
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.count16("column count")?;
        // Each value takes at least one byte.
        let mut values = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let at = self.pos;
            let value = match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                b't' => {
                    let len = self.count32("value length")?;
                    TupleValue::Text(self.take(len)?)
                }
                b'b' => {
                    let len = self.count32("value length")?;
                    TupleValue::Binary(self.take(len)?)
                }
                kind => {
                    return Err(DecodeError::UnknownValueKind {
                        msg: self.msg,
                        offset: at,
                        kind,
                    })
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    /// Error if anything is left after a complete message.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                msg: self.msg,
                offset: self.pos,
                extra,
            }),
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
