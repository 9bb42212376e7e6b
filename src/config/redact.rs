//! DSN redaction: connection strings end up in logs and messages.

/// Hides the password of a libpq connection string, in key/value form
/// (`password=...`, quoted or not) or URL form (`postgres://u:pw@h/db`,
/// `?password=...`).
pub fn redact_dsn(dsn: &str) -> String {
    let trimmed = dsn.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        redact_dsn_url(dsn)
    } else {
        redact_dsn_key_values(dsn)
    }
}

pub(super) fn redact_dsn_url(dsn: &str) -> String {
    let mut out = String::with_capacity(dsn.len());
    let scheme_end = dsn.find("://").map_or(0, |i| i + 3);
    let rest = &dsn[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    out.push_str(&dsn[..scheme_end]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    // query parameters: `password=` values end at `&` or `#`
    let mut parts = Vec::new();
    let (path_query, fragment) = match tail.find('#') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    match path_query.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for param in query.split('&') {
                let key = param.split('=').next().unwrap_or("");
                if key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword") {
                    parts.push(format!("{key}=***"));
                } else {
                    parts.push(param.to_string());
                }
            }
            out.push_str(&parts.join("&"));
        }
        None => out.push_str(path_query),
    }
    out.push_str(fragment);
    out
}

pub(super) fn redact_dsn_key_values(dsn: &str) -> String {
    let bytes = dsn.as_bytes();
    let mut out = String::with_capacity(dsn.len());
    let mut i = 0;
    while i < bytes.len() {
        // at the start of a key (after whitespace)?
        let at_key_start = i == 0 || bytes[i - 1].is_ascii_whitespace();
        let key = ["sslpassword", "password"].into_iter().find(|k| {
            at_key_start
                && dsn.len() >= i + k.len()
                && dsn[i..i + k.len()].eq_ignore_ascii_case(k)
                && dsn[i + k.len()..].trim_start().starts_with('=')
        });
        let Some(key) = key else {
            let c = dsn[i..].chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8().max(1);
            continue;
        };
        // copy `key  =  `
        let mut j = i + key.len();
        while j < bytes.len() && bytes[j] != b'=' {
            j += 1;
        }
        j += 1;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        out.push_str(&dsn[i..j]);
        // skip the value
        if j < bytes.len() && bytes[j] == b'\'' {
            j += 1;
            while j < bytes.len() && bytes[j] != b'\'' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j = (j + 1).min(bytes.len());
            out.push_str("'***'");
        } else {
            while j < bytes.len() && !bytes[j].is_ascii_whitespace() {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j = j.min(bytes.len());
            out.push_str("***");
        }
        i = j;
    }
    out
}
