//! Every key the file accepts has its entry in `docs/reference.md` and a
//! mention in `relay.toml.example`, and the quick start's configuration in
//! README.md is valid.
//!
//! The keys come from the serde structs themselves, not from a list kept by
//! hand: a struct with `deny_unknown_fields` that meets an unknown key names
//! every key it accepts ("unknown field `x`, expected one of `a`, `b`"). So
//! a field added to any raw struct is a key these tests ask about.

use super::raw::RawConfig;

const REFERENCE: &str = include_str!("../../docs/reference.md");
const EXAMPLE: &str = include_str!("../../relay.toml.example");

/// Keys the file still accepts only to refuse them with a pointer to their
/// replacement: documented as retired, absent from the example.
const RETIRED: &[&str] = &["relay.hash_salt"];

const PROBE: &str = "zz_probe";

/// One step down the file: a key, an entry of an array of tables, or a
/// table keyed by a name of the user's (`[regions.NAME]`).
#[derive(Clone)]
enum Step {
    Key(String),
    Entry,
    Named,
}

/// The keys of the table at `path`, or `None` when `path` holds no table of
/// fixed keys (a value, a map of values).
fn keys_at(path: &[Step]) -> Option<Vec<String>> {
    let mut value = format!("{{ {PROBE} = 1 }}");
    for step in path.iter().skip(1).rev() {
        value = match step {
            Step::Key(k) => format!("{{ {k} = {value} }}"),
            Step::Entry => format!("[{value}]"),
            Step::Named => format!("{{ name = {value} }}"),
        };
    }
    let document = match path.first() {
        None => format!("{PROBE} = 1"),
        Some(Step::Key(k)) => format!("{k} = {value}"),
        Some(_) => unreachable!("the file is a table of keys"),
    };
    let error = toml::from_str::<RawConfig>(&document).err()?.to_string();
    let unknown = format!("unknown field `{PROBE}`, expected ");
    let start = error.find(&unknown)? + unknown.len();
    let expected = error[start..].lines().next().unwrap_or_default();
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// Every key that holds a value, as `docs/reference.md` writes it:
/// `relay.capture.slot`, `regions.NAME.dsn`, `tables[].columns[].name`.
fn accepted_keys() -> Vec<String> {
    fn walk(path: &[Step], shown: &str, out: &mut Vec<String>) {
        for key in keys_at(path).expect("a table of keys") {
            let here: Vec<Step> = path
                .iter()
                .cloned()
                .chain([Step::Key(key.clone())])
                .collect();
            // a table, an array of tables, or a table of named tables
            let table = [
                (None, ""),
                (Some(Step::Entry), "[]"),
                (Some(Step::Named), ".NAME"),
            ]
            .into_iter()
            .map(|(step, mark)| (here.iter().cloned().chain(step).collect::<Vec<_>>(), mark))
            .find(|(deeper, _)| keys_at(deeper).is_some());
            match table {
                Some((deeper, mark)) => walk(&deeper, &format!("{shown}{key}{mark}."), out),
                None => out.push(format!("{shown}{key}")),
            }
        }
    }
    let mut out = Vec::new();
    walk(&[], "", &mut out);
    out
}

#[test]
fn the_keys_are_read_from_the_serde_structs() {
    let keys = accepted_keys();
    for key in [
        "relay.prefix",
        "relay.max_stamp_ahead",
        "relay.capture.stamp_trigger",
        "relay.apply.conflict_log",
        "relay.status.egress_price_per_gb",
        "verify.interval",
        "http.token",
        "kafka.brokers",
        "kafka.properties",
        "regions.NAME.dsn",
        "regions.NAME.dr_old_keys",
        "regions.NAME.kafka.brokers",
        "tables[].name",
        "tables[].allow",
        "tables[].columns[].merge",
        "breakers[].max_fraction",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    assert!(keys.len() >= 60, "{keys:?}");
}

#[test]
fn every_key_has_its_entry_in_the_reference() {
    let missing: Vec<String> = accepted_keys()
        .into_iter()
        .filter(|key| !REFERENCE.contains(&format!("\n| `{key}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/reference.md has no row `| `KEY` | type | default | meaning |` for {missing:?}"
    );
}

#[test]
fn every_key_is_shown_in_the_example() {
    let shown = |name: &str| {
        EXAMPLE.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line.starts_with(&format!("{name} ="))
                || line.starts_with('[')
                    && line.trim_end_matches(']').ends_with(&format!(".{name}"))
        })
    };
    let missing: Vec<String> = accepted_keys()
        .into_iter()
        .filter(|key| !RETIRED.contains(&key.as_str()))
        .filter(|key| !shown(key.rsplit(['.', ']']).next().unwrap_or(key)))
        .collect();
    assert!(
        missing.is_empty(),
        "relay.toml.example shows no `KEY = ...` line (or commented one) for {missing:?}"
    );
}

#[test]
fn the_quick_start_config_in_the_readme_is_valid() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("```toml\n")
        .expect("README.md shows a configuration")
        + "```toml\n".len();
    let end = start + readme[start..].find("```").expect("a closed code block");
    let config = super::parse_with_env(&readme[start..end], "README.md", |name| {
        Some(format!("value-of-{name}-0123456789abcdef"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.regions.keys().collect::<Vec<_>>(), ["eu", "us"]);
}
