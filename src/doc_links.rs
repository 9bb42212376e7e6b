//! The links between the Markdown files resolve: every `](path)` names a
//! file of the repository and every `](path#anchor)` (or `](#anchor)`) a
//! heading of that file, with GitHub's anchors. Sections move between
//! README.md and docs/; a link left behind fails here.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The Markdown files whose links are checked (and whose headings are
/// anchors), relative to the repository root.
const FILES: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "BENCHMARKS.md",
    "docker/README.md",
    "extension/README.md",
    "docs/operations.md",
    "docs/security.md",
    "docs/consistency.md",
    "docs/reference.md",
    "docs/contributing.md",
];

/// GitHub's anchor of a heading: lowercase, punctuation dropped (`-` and
/// `_` kept), spaces turned into `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines of `text` outside fenced code blocks, with their numbers.
fn prose(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fenced = false;
    text.lines().enumerate().filter_map(move |(i, line)| {
        if line.starts_with("```") {
            fenced = !fenced;
            return None;
        }
        (!fenced).then_some((i + 1, line))
    })
}

/// The anchors of a file's headings; a repeated heading gets `-1`, `-2`...
fn anchors(text: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    prose(text)
        .filter_map(|(_, line)| {
            let title = line.trim_start_matches('#');
            let level = line.len() - title.len();
            ((1..=6).contains(&level) && title.starts_with(' ')).then(|| anchor(title))
        })
        .map(|a| {
            let n = seen.entry(a.clone()).or_insert(0);
            *n += 1;
            match *n {
                1 => a,
                n => format!("{a}-{}", n - 1),
            }
        })
        .collect()
}

/// The targets of `](...)` links on a line.
fn targets(line: &str) -> impl Iterator<Item = &str> {
    line.match_indices("](").filter_map(|(at, _)| {
        let rest = &line[at + 2..];
        let end = rest.find(')')?;
        Some(&rest[..end]).filter(|t| !t.contains(char::is_whitespace))
    })
}

/// `base`/`relative` without `.` and `..`.
fn join(base: &Path, relative: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for part in base.join(relative).components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_link_between_the_markdown_files_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |file: &str| {
        std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let known: BTreeMap<PathBuf, Vec<String>> = FILES
        .iter()
        .map(|f| (PathBuf::from(f), anchors(&read(f))))
        .collect();
    let mut broken = Vec::new();
    for file in FILES {
        let dir = Path::new(file).parent().unwrap_or(Path::new(""));
        for (n, line) in prose(&read(file)) {
            for target in targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
                let resolved = match path {
                    "" => PathBuf::from(file),
                    path => join(dir, path),
                };
                if !root.join(&resolved).exists() {
                    broken.push(format!(
                        "{file}:{n}: {target}: no file {}",
                        resolved.display()
                    ));
                    continue;
                }
                if fragment.is_empty() {
                    continue;
                }
                match known.get(&resolved) {
                    Some(anchors) if anchors.iter().any(|a| a == fragment) => {}
                    Some(_) => broken.push(format!(
                        "{file}:{n}: {target}: no heading #{fragment} in {}",
                        resolved.display()
                    )),
                    None => broken.push(format!(
                        "{file}:{n}: {target}: an anchor in a file this test does not read"
                    )),
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_are_githubs() {
    assert_eq!(
        anchor(" Read your writes across regions: `pgrelay.wait_for`"),
        "read-your-writes-across-regions-pgrelaywait_for"
    );
    assert_eq!(
        anchors("# A\n```\n# not a heading\n```\n## A\n#no\n"),
        ["a", "a-1"]
    );
}
