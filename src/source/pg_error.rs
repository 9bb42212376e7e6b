//! A tokio-postgres error as one line that keeps its cause.
//!
//! `tokio_postgres::Error`'s own `Display` is only its kind ("db error",
//! "error performing TLS handshake"); the server's message, the TLS
//! library's reason or the I/O error sit in its source chain.

/// The server's message (with detail, hint and SQLSTATE) for a database
/// error; otherwise the error's kind followed by every cause in its chain.
pub fn reason(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = db.message().to_string();
        if let Some(detail) = db.detail() {
            out.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; hint: {hint}"));
        }
        out.push_str(&format!(" [SQLSTATE {}]", db.code().code()));
        return out;
    }
    chain(e)
}

/// An error followed by each of its sources, skipping a source whose text
/// its parent already shows. A database error among them is shown as
/// [`reason`] gives it (or not at all when its message is already shown),
/// and ends the chain: what lies under it is part of it.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            let shown = pg
                .as_db_error()
                .map_or_else(|| reason(pg), |db| db.message().to_string());
            if !out.contains(&shown) {
                out.push_str(": ");
                out.push_str(&reason(pg));
            }
            break;
        }
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
