//! [`ConfigError`]: every way a config can be wrong, with file, line and
//! what to write instead.

// ---------------------------------------------------------------------------
// errors

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{origin}, line {line}: environment variable {var} is not set (or not valid UTF-8); \
         export it, or write $${{ for a literal \"${{\""
    )]
    MissingEnv {
        origin: String,
        line: usize,
        var: String,
    },
    /// Several variables outside a region's secrets are not set.
    #[error(
        "{origin}: environment variables {} are not set (or not valid UTF-8); export them, or \
         write $${{ for a literal \"${{\"",
        list_vars(.vars)
    )]
    MissingEnvs {
        origin: String,
        /// Each variable and the first line that uses it.
        vars: Vec<(String, usize)>,
    },
    /// A value this command needs holds a variable that is not set.
    #[error(
        "{origin}, line {line}: environment variable {var} is not set (or not valid UTF-8), \
         and {key} needs it for this command; export it"
    )]
    UnsetSecret {
        origin: String,
        line: usize,
        var: String,
        key: String,
    },
    /// Several values this command needs hold variables that are not set.
    #[error(
        "{origin}: environment variables {} are not set (or not valid UTF-8), and this command \
         needs them; export them",
        list_secrets(.secrets)
    )]
    UnsetSecrets {
        origin: String,
        /// Each variable, the line of the value, the value's key.
        secrets: Vec<(String, usize, String)>,
    },
    #[error("{origin}, line {line}: {message}")]
    Interpolation {
        origin: String,
        line: usize,
        message: String,
    },
    /// The text is not TOML, a key is unknown, or a value has the wrong type.
    #[error("{}", render_located(.origin, *.line, *.column, .message, .excerpt))]
    Syntax {
        origin: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
        /// The offending line as written in the file (before interpolation,
        /// so secrets from the environment never show).
        excerpt: Option<String>,
    },
    /// Well-formed TOML that breaks a rule (undeclared region, missing owner...).
    #[error("{}", render_located(.origin, *.line, None, .message, &None))]
    Invalid {
        origin: String,
        line: Option<usize>,
        message: String,
    },
    #[error("region {region:?} is not declared in {origin}; declared regions: {declared}")]
    UnknownRegion {
        origin: String,
        region: String,
        declared: String,
    },
}

/// `A (line 3), B (line 7)`.
fn list_vars(vars: &[(String, usize)]) -> String {
    vars.iter()
        .map(|(var, line)| format!("{var} (line {line})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `A (line 3: regions.us.dsn), B (line 7: regions.us.hash_key)`.
fn list_secrets(secrets: &[(String, usize, String)]) -> String {
    secrets
        .iter()
        .map(|(var, line, key)| format!("{var} (line {line}: {key})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ConfigError {
    /// The line the error is about, when it names one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::MissingEnv { line, .. }
            | ConfigError::UnsetSecret { line, .. }
            | ConfigError::Interpolation { line, .. } => Some(*line),
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => *line,
            _ => None,
        }
    }
}

pub(super) fn render_located(
    origin: &str,
    line: Option<usize>,
    column: Option<usize>,
    message: &str,
    excerpt: &Option<String>,
) -> String {
    let mut out = origin.to_string();
    if let Some(line) = line {
        out.push_str(&format!(", line {line}"));
        if let Some(column) = column {
            out.push_str(&format!(", column {column}"));
        }
    }
    out.push_str(": ");
    out.push_str(message.trim_end());
    if let (Some(line), Some(excerpt)) = (line, excerpt) {
        out.push_str(&format!("\n  {line} | {excerpt}"));
    }
    out
}
