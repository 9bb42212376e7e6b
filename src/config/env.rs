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
pub(super) fn interpolate(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<(String, usize)>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut state = Lexical::Bare;
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
            insert_value(&mut out, &value, state).map_err(|why| ConfigError::Interpolation {
                origin: origin.to_string(),
                line,
                message: format!("the value of environment variable {name} {why}"),
            })?;
            i += end + 1;
            continue;
        }
        let (next, consumed) = lex_step(state, rest, c);
        out.push_str(&rest[..consumed]);
        line += rest[..consumed].matches('\n').count();
        state = next;
        i += consumed;
    }
    Ok(out)
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
