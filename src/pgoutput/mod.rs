//! Decoder for PostgreSQL's logical replication stream.
//!
//! Two layers, both pure functions from bytes to values (no IO, no async,
//! no state between calls):
//!
//! * [`frame`]: the `CopyData` payloads of a `START_REPLICATION` stream:
//!   `XLogData` (`'w'`) and primary keepalive (`'k'`) frames, and the encoder
//!   for the standby status update (`'r'`) we send back.
//! * [`decode`](mod@decode): one `pgoutput` message (the `XLogData` payload),
//!   protocol version 1 (no streaming, no two-phase): Begin, Commit, Origin,
//!   Relation, Type, Insert, Update, Delete, Truncate and logical decoding
//!   messages.
//!
//! Decoding is zero-copy: column values and message contents are
//! [`Bytes`](bytes::Bytes) slices of the input buffer, so a row costs one
//! `Vec` allocation and no per-column allocation. Only identifiers (schema,
//! table, column, type and origin names, message prefixes) become `String`s;
//! they are validated as UTF-8. Column values stay raw: text-format values
//! are PostgreSQL's output text, binary-format values its `send` output, and
//! the consumer converts them.
//!
//! Timestamps are converted from PostgreSQL's epoch (2000-01-01) to
//! microseconds since the Unix epoch on the way in, and back on the way out.
//!
//! Error policy: no input makes these functions panic. Anything malformed
//! (empty input, unknown message tag or tuple marker, a length or count that
//! is negative or runs past the end of the buffer, an unterminated string,
//! invalid UTF-8 in an identifier, bytes left over after a complete message)
//! is reported as a [`DecodeError`] naming the message kind and the byte
//! offset in the buffer that was being decoded.

pub mod decode;
pub mod frame;

pub use decode::{decode, DecodeError, Message, OldKind, RelColumn, Tuple, TupleValue};
pub use frame::{encode_status_update, parse_frame, Frame};
