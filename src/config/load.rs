//! Reading and parsing: file → interpolated text → raw structs → [`Config`].

use std::collections::BTreeMap;
use std::path::Path;

use super::env::interpolate;
use super::raw::RawConfig;
use super::validate::Validator;
use super::{Config, ConfigError};

// ---------------------------------------------------------------------------
// entry points

/// Reads `path` and parses it with [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates a config; `${VAR}` reads the process environment.
/// `origin` (the file name) prefixes every message.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with_env(text, origin, |name| std::env::var(name).ok())
}

/// [`parse`] with an explicit environment (tests, tools).
pub fn parse_with_env(
    text: &str,
    origin: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut unset = Vec::new();
    let interpolated = interpolate(text, origin, &env, &mut unset)?;
    // an error on a line that holds an unset variable may be that
    // variable's doing: name it; any other error is the config's own
    let unset_on = |line: Option<usize>| {
        let line = line?;
        unset
            .iter()
            .find(|(_, l)| *l == line)
            .map(|(var, line)| ConfigError::MissingEnv {
                origin: origin.to_string(),
                line: *line,
                var: var.clone(),
            })
    };
    let raw: RawConfig = toml::from_str(&interpolated).map_err(|e| {
        let line = e.span().map(|s| line_column(&interpolated, s.start).0);
        unset_on(line).unwrap_or_else(|| syntax_error(e, origin, text, &interpolated))
    })?;
    let mut first_lines: BTreeMap<String, usize> = BTreeMap::new();
    let mut uses: BTreeMap<&str, usize> = BTreeMap::new();
    for (var, line) in &unset {
        first_lines.entry(var.clone()).or_insert(*line);
        *uses.entry(var.as_str()).or_default() += 1;
    }
    // every use of an unset variable must be in a region-scoped secret:
    // the others are named all at once
    let scoped = raw.scoped_values();
    let outside: Vec<(String, usize)> = uses
        .iter()
        .filter(|(var, count)| {
            let marker = format!("${{{var}}}");
            let in_scope: usize = scoped.iter().map(|v| v.matches(&marker).count()).sum();
            in_scope < **count
        })
        .map(|(var, _)| (var.to_string(), first_lines[*var]))
        .collect();
    let config = Validator {
        origin,
        text: &interpolated,
        unset: &first_lines,
    }
    .validate(raw);
    let mut config = match config {
        // a rule broken on a line of its own is reported first
        Err(e) => {
            let line = e.line();
            return Err(match unset_on(line) {
                Some(ConfigError::MissingEnv { var, .. })
                    if outside.iter().any(|(v, _)| *v == var) =>
                {
                    missing_env(origin, outside)
                }
                Some(missing) => missing,
                None if line.is_none() && !outside.is_empty() => missing_env(origin, outside),
                None => e,
            });
        }
        Ok(_) if !outside.is_empty() => return Err(missing_env(origin, outside)),
        Ok(config) => config,
    };
    config.unset = first_lines;
    Ok(config)
}

/// Variables outside a region's secrets that are not set: one error naming
/// them all, each with its first line.
fn missing_env(origin: &str, mut vars: Vec<(String, usize)>) -> ConfigError {
    if vars.len() == 1 {
        let (var, line) = vars.remove(0);
        return ConfigError::MissingEnv {
            origin: origin.to_string(),
            line,
            var,
        };
    }
    vars.sort_by_key(|(_, line)| *line);
    ConfigError::MissingEnvs {
        origin: origin.to_string(),
        vars,
    }
}

pub(super) fn syntax_error(
    e: toml::de::Error,
    origin: &str,
    raw: &str,
    interpolated: &str,
) -> ConfigError {
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            origin: origin.to_string(),
            line: None,
            column: None,
            message: without_retired_keys(e.message()),
            excerpt: None,
        };
    };
    let (line, column) = line_column(interpolated, span.start);
    // Interpolation keeps line numbers, so the raw line is the same line;
    // show it (not the interpolated one, which may hold secrets), and the
    // column only when interpolation did not change that line.
    let raw_line = raw.lines().nth(line - 1).unwrap_or("");
    let new_line = interpolated.lines().nth(line - 1).unwrap_or("");
    ConfigError::Syntax {
        origin: origin.to_string(),
        line: Some(line),
        column: (raw_line == new_line).then_some(column),
        message: without_retired_keys(e.message()),
        excerpt: Some(raw_line.to_string()),
    }
}

/// Keys the raw structs still accept only to refuse them with a migration
/// note: not offered in an unknown key's list of expected ones.
const RETIRED_KEYS: [&str; 1] = ["hash_salt"];

fn without_retired_keys(message: &str) -> String {
    RETIRED_KEYS.iter().fold(message.to_string(), |m, key| {
        m.replace(&format!(", `{key}`"), "")
    })
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
