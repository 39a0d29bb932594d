//! The house rule of DESIGN.md, checked on the source: arrows point down only. Each
//! top-level module may import only the modules listed for it below, so a provider, the
//! limiter or the cache can never reach up into a front door (or an HTTP error type),
//! and the limiter never into the cache.

use std::collections::BTreeSet;
use std::path::Path;

/// What each top-level module of `src/` may import from the crate.
const ALLOWED: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("settings", &[]),
    ("telemetry", &["domain", "settings"]),
    // The upstream simulator stands alone: mock-llm and demo mode run it.
    ("simulator", &[]),
    ("serve", &["settings"]),
    ("ratelimit", &["domain", "serve", "settings", "telemetry"]),
    ("cache", &["domain", "serve", "settings", "telemetry"]),
    ("providers", &["domain", "serve", "settings", "telemetry"]),
    (
        "chat",
        &[
            "cache",
            "domain",
            "providers",
            "ratelimit",
            "settings",
            "telemetry",
        ],
    ),
    (
        "api",
        &[
            "cache",
            "chat",
            "domain",
            "providers",
            "ratelimit",
            "serve",
            "settings",
            "telemetry",
        ],
    ),
    (
        "state",
        &[
            "api",
            "cache",
            "chat",
            "domain",
            "providers",
            "ratelimit",
            "serve",
            "settings",
            "telemetry",
        ],
    ),
    (
        "app",
        &[
            "api",
            "serve",
            "settings",
            "simulator",
            "state",
            "telemetry",
        ],
    ),
];

/// The crate modules `source` names (`crate::x::...`), `x` only.
fn imports(source: &str) -> BTreeSet<String> {
    source
        .match_indices("crate::")
        .filter_map(|(at, _)| {
            let rest = &source[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

fn sources(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut checked = BTreeSet::new();
    let mut violations = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if matches!(top.as_str(), "lib" | "main" | "bin") {
            continue;
        }
        let allowed = ALLOWED
            .iter()
            .find(|(name, _)| *name == top)
            .unwrap_or_else(|| panic!("{top}: a new top-level module needs a row in ALLOWED"))
            .1;
        checked.insert(top.clone());
        let source = std::fs::read_to_string(&file).unwrap();
        for import in imports(&source) {
            if import != top && !allowed.contains(&import.as_str()) {
                violations.push(format!("{} imports crate::{import}", relative.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "arrows must point down: {violations:#?}"
    );
    assert!(
        checked.len() >= 10,
        "the walk found the modules: {checked:?}"
    );
}

#[test]
fn the_import_scan_sees_paths_in_use_lines_and_in_code() {
    let found = imports(
        "use crate::domain::ChatError;\nlet m = crate::telemetry::metrics::Metrics::new();",
    );
    assert_eq!(
        found,
        BTreeSet::from(["domain".to_owned(), "telemetry".to_owned()])
    );
}
