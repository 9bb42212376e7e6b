//! `${ENV}` interpolation: secrets substituted into the TOML text before
//! it is parsed, escaped for the string they land in.

use super::ConfigError;

// ---------------------------------------------------------------------------
// ${ENV} interpolation

/// Where in the TOML text a `${` occurs: decides how a value is escaped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Lexical {
    /// Outside strings: the value is inserted verbatim.
    Bare,
    Comment,
    /// `"..."`
    Basic,
    /// `"""..."""`
    MultiBasic,
    /// `'...'`
    Literal,
    /// `'''...'''`
    MultiLiteral,
}

/// Replaces `${VAR}` by the variable's value and `$${` by `${`.
///
/// A variable that is not set is left as written inside a string (and
/// listed in `unset`, with its line): the caller decides whether the value
/// holding it is needed. Outside strings it is an error at once.
///
/// A tiny TOML lexer tracks strings and comments so that a value is escaped
/// for the string it lands in (a password may hold `"` or `\`) and comments
/// are left alone (they may mention `${VAR}` freely). Values never contain a
/// line break after escaping, so line numbers stay those of the file.
///
/// Inside a connection string (the value of a `dsn` or `setup_dsn` key) the
/// value is escaped for the connection string first ([`dsn_escape`]), so
/// `password=${PW}` carries a password with spaces, quotes or backslashes
/// as it is.
pub(super) fn interpolate(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<(String, usize)>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut state = Lexical::Bare;
    // where the text of the current string starts in `out`, if it is a
    // connection string
    let mut dsn_start: Option<usize> = None;
    let mut line = 1;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let c = rest.chars().next().unwrap_or_default();
        if state != Lexical::Comment && rest.starts_with("$${") {
            out.push_str("${");
            i += 3;
            continue;
        }
        if state != Lexical::Comment && rest.starts_with("${") {
            let end = rest.find('}').filter(|&e| !rest[..e].contains('\n'));
            let Some(end) = end else {
                return Err(ConfigError::Interpolation {
                    origin: origin.to_string(),
                    line,
                    message: "\"${\" without a closing \"}\" on the same line; \
                              write $${ for a literal \"${\""
                        .to_string(),
                });
            };
            let name = &rest[2..end];
            if !is_env_name(name) {
                return Err(ConfigError::Interpolation {
                    origin: origin.to_string(),
                    line,
                    message: format!(
                        "${{{name}}}: not a variable name (letters, digits and _, \
                         not starting with a digit); write $${{ for a literal \"${{\""
                    ),
                });
            }
            let value = match env(name) {
                Some(value) => value,
                None if matches!(state, Lexical::Bare | Lexical::Comment) => {
                    return Err(ConfigError::MissingEnv {
                        origin: origin.to_string(),
                        line,
                        var: name.to_string(),
                    })
                }
                None => {
                    unset.push((name.to_string(), line));
                    out.push_str(&rest[..=end]);
                    i += end + 1;
                    continue;
                }
            };
            let value = match dsn_start {
                Some(start) => dsn_escape(&string_text(&out[start..], state), &value),
                None => value,
            };
            insert_value(&mut out, &value, state).map_err(|why| ConfigError::Interpolation {
                origin: origin.to_string(),
                line,
                message: format!("the value of environment variable {name} {why}"),
            })?;
            i += end + 1;
            continue;
        }
        let (next, consumed) = lex_step(state, rest, c);
        if state == Lexical::Bare && next != Lexical::Bare && next != Lexical::Comment {
            dsn_start = is_dsn_key(line_before(&out)).then_some(out.len() + consumed);
        } else if next == Lexical::Bare {
            dsn_start = None;
        }
        out.push_str(&rest[..consumed]);
        line += rest[..consumed].matches('\n').count();
        state = next;
        i += consumed;
    }
    Ok(out)
}

/// The text of `out`'s last line.
fn line_before(out: &str) -> &str {
    out.rsplit('\n').next().unwrap_or(out)
}

/// Whether a string opened after `before` (its line so far) is the value of
/// a connection string key: `dsn = `, `setup_dsn = ` (dotted or in an inline
/// table too).
fn is_dsn_key(before: &str) -> bool {
    let Some(key) = before.trim_end().strip_suffix('=') else {
        return false;
    };
    let key = key.trim_end();
    ["setup_dsn", "dsn"].into_iter().any(|k| {
        key.strip_suffix(k).is_some_and(|head| {
            head.is_empty() || head.ends_with(|c: char| c.is_whitespace() || "{,.\"".contains(c))
        }) || key.ends_with(&format!("\"{k}\""))
    })
}

/// The content of a string so far (`raw`, as written in the file) with
/// TOML's escapes undone, as far as the connection string's syntax needs.
fn string_text(raw: &str, state: Lexical) -> String {
    if !matches!(state, Lexical::Basic | Lexical::MultiBasic) {
        return raw.to_string();
    }
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => text.extend(chars.next()),
            c => text.push(c),
        }
    }
    text
}

/// `value` escaped for where it lands in a connection string whose text so
/// far is `before`: percent-encoded in a `postgres://` URL; in libpq's
/// `key=value` form, a backslash before each backslash and quote (and, in an
/// unquoted value, before each space), or `''` for an empty value.
pub(super) fn dsn_escape(before: &str, value: &str) -> String {
    let trimmed = before.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let mut out = String::with_capacity(value.len());
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        return out;
    }
    let context = key_value_context(before);
    if context == KeyValue::Key {
        return value.to_string();
    }
    if value.is_empty() && context == KeyValue::ValueStart {
        return "''".to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        let escape = c == '\\' || c == '\'' || (context != KeyValue::Quoted && c.is_whitespace());
        if escape {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Where the end of a `key=value` connection string's text stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KeyValue {
    /// Between parameters or in a key.
    Key,
    /// Right after `=` (and spaces).
    ValueStart,
    /// In an unquoted value.
    Unquoted,
    /// In a `'...'` value.
    Quoted,
}

fn key_value_context(text: &str) -> KeyValue {
    let mut context = KeyValue::Key;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        context = match (context, c) {
            (KeyValue::Key, '=') => KeyValue::ValueStart,
            (KeyValue::Key, _) => KeyValue::Key,
            (KeyValue::ValueStart, c) if c.is_whitespace() => KeyValue::ValueStart,
            (KeyValue::ValueStart, '\'') => KeyValue::Quoted,
            (KeyValue::ValueStart | KeyValue::Unquoted, '\\') => {
                chars.next();
                KeyValue::Unquoted
            }
            (KeyValue::ValueStart | KeyValue::Unquoted, c) if c.is_whitespace() => KeyValue::Key,
            (KeyValue::ValueStart | KeyValue::Unquoted, _) => KeyValue::Unquoted,
            (KeyValue::Quoted, '\\') => {
                chars.next();
                KeyValue::Quoted
            }
            (KeyValue::Quoted, '\'') => KeyValue::Key,
            (KeyValue::Quoted, _) => KeyValue::Quoted,
        };
    }
    context
}

/// One lexer step from `state` at the start of `rest` (whose first char is
/// `c`): the next state and how many bytes to copy.
pub(super) fn lex_step(state: Lexical, rest: &str, c: char) -> (Lexical, usize) {
    let one = c.len_utf8();
    match state {
        Lexical::Bare => match c {
            '#' => (Lexical::Comment, one),
            '"' if rest.starts_with("\"\"\"") => (Lexical::MultiBasic, 3),
            '"' => (Lexical::Basic, one),
            '\'' if rest.starts_with("'''") => (Lexical::MultiLiteral, 3),
            '\'' => (Lexical::Literal, one),
            _ => (Lexical::Bare, one),
        },
        Lexical::Comment => match c {
            '\n' => (Lexical::Bare, one),
            _ => (Lexical::Comment, one),
        },
        Lexical::Basic => match c {
            '\\' => (Lexical::Basic, escaped_len(rest)),
            '"' | '\n' => (Lexical::Bare, one),
            _ => (Lexical::Basic, one),
        },
        Lexical::MultiBasic => match c {
            '\\' => (Lexical::MultiBasic, escaped_len(rest)),
            '"' if rest.starts_with("\"\"\"") => (Lexical::Bare, quote_run(rest, '"')),
            _ => (Lexical::MultiBasic, one),
        },
        Lexical::Literal => match c {
            '\'' | '\n' => (Lexical::Bare, one),
            _ => (Lexical::Literal, one),
        },
        Lexical::MultiLiteral => match c {
            '\'' if rest.starts_with("'''") => (Lexical::Bare, quote_run(rest, '\'')),
            _ => (Lexical::MultiLiteral, one),
        },
    }
}

/// A backslash and the character it escapes.
pub(super) fn escaped_len(rest: &str) -> usize {
    1 + rest[1..].chars().next().map_or(0, char::len_utf8)
}

/// A closing `"""` may be preceded by up to two quotes of content.
pub(super) fn quote_run(rest: &str, quote: char) -> usize {
    rest.chars().take(5).take_while(|&c| c == quote).count()
}

pub(super) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Appends `value` escaped for the lexical context, or says why it can't be.
pub(super) fn insert_value(
    out: &mut String,
    value: &str,
    state: Lexical,
) -> Result<(), &'static str> {
    match state {
        Lexical::Basic | Lexical::MultiBasic => {
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                    c => out.push(c),
                }
            }
        }
        Lexical::Literal => {
            if value.contains(['\'', '\n', '\r']) {
                return Err(
                    "contains a quote or a line break, which a '...' string cannot \
                            hold; use a \"...\" string instead",
                );
            }
            out.push_str(value);
        }
        Lexical::MultiLiteral => {
            if value.contains("'''") || value.contains(['\n', '\r']) {
                return Err("contains ''' or a line break; use a \"...\" string instead");
            }
            out.push_str(value);
        }
        Lexical::Bare => {
            if value.contains(['\n', '\r']) {
                return Err("contains a line break; put ${...} inside a \"...\" string");
            }
            out.push_str(value);
        }
        Lexical::Comment => out.push_str(value),
    }
    Ok(())
}
