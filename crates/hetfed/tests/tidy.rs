//! Tidy checks of the workspace itself: the crate dependency list in ARCHITECTURE.md's code map
//! is exactly what the `crates/*/Cargo.toml` files say, and the crate graph has no cycle.
//!
//! The list is the Markdown bullets of the form
//!
//! ```text
//! - `hetfed-x` → `hetfed-y`, `hetfed-z`
//! - `hetfed-core` → (none)
//! ```
//!
//! (a bullet may continue on indented lines), one per crate, each crate above its dependencies.
//! Only normal dependencies count (`[dependencies]` and `[target.*.dependencies]`), not dev or
//! build dependencies, and only the workspace's own `hetfed*` crates.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Crate name → its direct `hetfed*` dependencies.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn is_ours(name: &str) -> bool {
    name == "hetfed" || name.starts_with("hetfed-")
}

/// The `hetfed*` crates among a dependency table's entries (a renamed entry counts by `package`).
fn our_deps(table: Option<&toml::Value>, manifest: &Path, out: &mut BTreeSet<String>) {
    let Some(table) = table else { return };
    let table =
        table.as_table().unwrap_or_else(|| panic!("{}: a dependency section is not a table", manifest.display()));
    for (key, spec) in table {
        let name = spec.get("package").and_then(toml::Value::as_str).unwrap_or(key);
        if is_ours(name) {
            out.insert(name.to_string());
        }
    }
}

/// The dependency graph the `crates/*/Cargo.toml` files declare, and each crate's manifest path.
fn cargo_graph() -> (Graph, BTreeMap<String, PathBuf>) {
    let mut graph = Graph::new();
    let mut manifests = BTreeMap::new();
    let crates = root().join("crates");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&crates)
        .unwrap_or_else(|e| panic!("{}: {e}", crates.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        let manifest = dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
        let doc: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
        let name = doc
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(toml::Value::as_str)
            .unwrap_or_else(|| panic!("{}: expected [package] name", manifest.display()))
            .to_string();
        let mut deps = BTreeSet::new();
        our_deps(doc.get("dependencies"), &manifest, &mut deps);
        if let Some(targets) = doc.get("target").and_then(toml::Value::as_table) {
            for target in targets.values() {
                our_deps(target.get("dependencies"), &manifest, &mut deps);
            }
        }
        assert!(graph.insert(name.clone(), deps).is_none(), "two crates are named `{name}`");
        manifests.insert(name, manifest);
    }
    (graph, manifests)
}

/// `` `name` `` → `name`.
fn ticked(s: &str) -> Option<&str> {
    s.strip_prefix('`')?.strip_suffix('`')
}

/// The bullets `` - `crate` → `dep`, `dep` `` (or `→ (none)`) of a Markdown text, in order of
/// appearance. Errs on a malformed bullet or a crate listed twice.
fn parse_list(text: &str) -> Result<Vec<(String, BTreeSet<String>)>, String> {
    // Join each bullet with its indented continuation lines.
    let mut bullets: Vec<(usize, String)> = Vec::new();
    let mut open = false;
    for (i, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("- `").filter(|r| r.contains("` →")) {
            bullets.push((i + 1, format!("`{rest}")));
            open = true;
        } else if open && line.starts_with("  ") && !line.trim().is_empty() {
            let b = &mut bullets.last_mut().expect("an open bullet").1;
            b.push(' ');
            b.push_str(line.trim());
        } else {
            open = false;
        }
    }
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    for (line, bullet) in bullets {
        let (lhs, rhs) = bullet.split_once(" → ").ok_or_else(|| format!("line {line}: expected `crate` → deps"))?;
        let name = ticked(lhs.trim()).ok_or_else(|| format!("line {line}: expected a `crate` before →"))?;
        let rhs = rhs.trim().trim_end_matches(['.', ';']);
        let mut deps = BTreeSet::new();
        if rhs != "(none)" {
            for d in rhs.split(',') {
                let d = ticked(d.trim()).ok_or_else(|| {
                    format!("line {line}: `{name}`: expected `dep`, `dep`, ... or (none), found {rhs:?}")
                })?;
                if !deps.insert(d.to_string()) {
                    return Err(format!("line {line}: `{name}` lists `{d}` twice"));
                }
            }
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("line {line}: `{name}` is listed twice"));
        }
        out.push((name.to_string(), deps));
    }
    Ok(out)
}

/// One cycle of the graph, as a path that ends where it starts, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        n: &'a str,
        graph: &'a Graph,
        done: &mut BTreeSet<&'a str>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| *p == n) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n);
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n);
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

#[test]
fn architecture_lists_every_crates_hetfed_dependencies() {
    let (cargo, manifests) = cargo_graph();
    assert!(cargo.contains_key("hetfed-core") && cargo.len() > 5, "expected the workspace's crates, found {cargo:?}");
    let path = root().join("ARCHITECTURE.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let listed = parse_list(&text).unwrap_or_else(|e| panic!("ARCHITECTURE.md: dependency list: {e}"));

    let mut problems = Vec::new();
    let position: BTreeMap<&str, usize> = listed.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    for (name, deps) in &listed {
        let Some(actual) = cargo.get(name) else {
            problems.push(format!("ARCHITECTURE.md lists `{name}`, which is no crate under crates/"));
            continue;
        };
        let manifest = manifests[name].strip_prefix(root()).unwrap_or(&manifests[name]).display().to_string();
        for d in deps.difference(actual) {
            problems.push(format!(
                "ARCHITECTURE.md says `{name}` depends on `{d}`, but {manifest} has no such [dependencies] entry"
            ));
        }
        for d in actual.difference(deps) {
            problems.push(format!(
                "{manifest}: `{name}` depends on `{d}`, which ARCHITECTURE.md's list for `{name}` leaves out"
            ));
        }
        for d in deps {
            if position.get(d.as_str()).is_some_and(|&j| j < position[name.as_str()]) {
                problems.push(format!(
                    "ARCHITECTURE.md lists `{d}` above `{name}`, which depends on it (dependencies point downward)"
                ));
            }
        }
    }
    for name in cargo.keys() {
        if !position.contains_key(name.as_str()) {
            problems.push(format!("crate `{name}` is missing from ARCHITECTURE.md's dependency list"));
        }
    }
    assert!(problems.is_empty(), "ARCHITECTURE.md's dependency list differs from Cargo.toml:\n{}", problems.join("\n"));
}

#[test]
fn crate_graph_has_no_cycle() {
    let (cargo, _) = cargo_graph();
    if let Some(cycle) = find_cycle(&cargo) {
        panic!("the crate graph has a cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn the_checks_themselves_catch_mistakes() {
    let list =
        parse_list("text\n- `a` → `b`,\n  `c`\n- `b` → `c`\n- `c` → (none)\n\n- **`crates/a`**: prose\n").unwrap();
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(list[0].1, BTreeSet::from(["b".to_string(), "c".to_string()]));
    assert!(list[2].1.is_empty());
    assert!(parse_list("- `a` → b\n").unwrap_err().contains("`a`"));
    assert!(parse_list("- `a` → `b`\n- `a` → (none)\n").unwrap_err().contains("listed twice"));

    let graph = |edges: &[(&str, &str)]| {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let cycle = find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
}
