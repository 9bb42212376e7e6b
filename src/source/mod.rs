//! The source database: replication connection, catalog queries, and the
//! assembly of protocol messages into row changes.

pub mod assemble;
pub mod catalog;
pub mod conn;
pub mod dsn;
pub mod fill;
pub mod pg_error;
pub mod server;
pub mod tls;
