//! The dependency direction between the crates, read from their manifests, and between the
//! modules of the peer runtime, read from its sources.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

/// Each workspace crate's normal and build dependencies on other workspace crates.
fn workspace_edges() -> BTreeMap<String, Vec<String>> {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let packages = metadata["packages"].as_array().expect("packages");
    let names: Vec<String> = packages
        .iter()
        .map(|package| package["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    packages
        .iter()
        .map(|package| {
            let dependencies = package["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                // Dev-dependencies may reach further (a test may start a server); the
                // invariant is about what the code itself links.
                .filter(|dependency| dependency["kind"].as_str() != Some("dev"))
                .filter_map(|dependency| dependency["name"].as_str())
                .filter(|name| names.iter().any(|known| known == name))
                .map(str::to_owned)
                .collect();
            (
                package["name"].as_str().unwrap_or_default().to_owned(),
                dependencies,
            )
        })
        .collect()
}

#[test]
fn dependency_direction_matches_the_design() {
    let edges = workspace_edges();
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("proto", &[][..]),
        ("durable", &[][..]),
        ("store", &["proto", "durable"][..]),
        ("discovery", &["proto", "store"][..]),
        ("peer", &["proto", "durable"][..]),
        ("cli", &["peer", "proto"][..]),
        ("bench", &["proto", "store", "discovery", "peer"][..]),
        ("tests", &[][..]),
    ]);
    for (package, dependencies) in &edges {
        let permitted = allowed
            .get(package.as_str())
            .unwrap_or_else(|| panic!("crate {package} is not in the design's dependency table"));
        for dependency in dependencies {
            assert!(
                permitted.contains(&dependency.as_str()),
                "{package} must not depend on {dependency} (ARCHITECTURE.md)"
            );
        }
    }
    for package in [
        "proto",
        "durable",
        "store",
        "discovery",
        "peer",
        "cli",
        "bench",
        "tests",
    ] {
        assert!(edges.contains_key(package), "crate {package} is missing");
    }
    // Nothing depends on the binaries' crates.
    for (package, dependencies) in &edges {
        for leaf in ["cli", "discovery", "bench"] {
            if package != "bench" || leaf != "discovery" {
                assert!(
                    !dependencies.iter().any(|d| d == leaf),
                    "{package} depends on {leaf}, which nothing may depend on"
                );
            }
        }
    }
}

/// A source file's code before its unit tests (an inline `#[cfg(test)] mod tests { .. }`).
/// A `mod tests;` declaration cuts nothing: the code after it is read, and the folder's
/// `tests.rs` is left out where folders are read.
fn without_unit_tests(source: &str) -> &str {
    source
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or_default()
}

/// The `crate::` modules a source file's code (not its comments or tests) refers to.
fn module_references(source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code: String = without_unit_tests(source)
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut note = |name: &str| {
        let name = name.trim().split("::").next().unwrap_or_default().trim();
        if modules.contains(name) {
            found.insert(name.to_owned());
        }
    };
    for (index, _) in code.match_indices("crate::") {
        let rest = &code[index + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::X, b::{Y, Z}, c}`: the names at the group's top level.
            let mut depth = 0;
            let mut item = String::new();
            for character in group.chars() {
                match character {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        note(&item);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(character);
            }
            note(&item);
        } else {
            let name: String = rest
                .chars()
                .take_while(|character| character.is_ascii_alphanumeric() || *character == '_')
                .collect();
            note(&name);
        }
    }
    found
}

/// The peer runtime's modules import one another without a cycle: the client API types,
/// the shell, the core, the state and the links each sit in a module of their own, and no
/// module imports from a module that imports it.
#[test]
fn peer_modules_import_one_another_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/peer/src");
    // A module is a file `name.rs`, or a folder `name/` (its `mod.rs` and the
    // submodules beside it, read as one source: they are one module to the others). Each
    // file's code is taken up to its unit tests, and a folder's `tests.rs` is left out, so
    // that a test module in one file does not hide the files after it.
    let sources: BTreeMap<String, String> = std::fs::read_dir(&src)
        .expect("peer sources")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if path.is_dir() {
                let mut files: Vec<_> = std::fs::read_dir(&path)
                    .expect("a module folder")
                    .filter_map(Result::ok)
                    .map(|file| file.path())
                    .filter(|file| file.extension().is_some_and(|ext| ext == "rs"))
                    .filter(|file| file.file_name().is_some_and(|name| name != "tests.rs"))
                    .collect();
                files.sort();
                let source = files
                    .iter()
                    .map(|file| {
                        let source = std::fs::read_to_string(file).expect("readable source");
                        without_unit_tests(&source).to_owned()
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Some((name, source));
            }
            let module = name.strip_suffix(".rs")?.to_owned();
            (module != "lib").then(|| {
                let source = std::fs::read_to_string(&path).expect("readable source");
                (module, source)
            })
        })
        .collect();
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    for module in [
        "api", "core", "shell", "state", "link", "context", "runtime",
    ] {
        assert!(
            modules.contains(module),
            "crates/peer/src/{module}.rs (or {module}/) is missing"
        );
    }
    let edges: BTreeMap<&str, BTreeSet<String>> = sources
        .iter()
        .map(|(module, source)| {
            let mut references = module_references(source, &modules);
            references.remove(module);
            (module.as_str(), references)
        })
        .collect();
    // The core is pure: it never reaches the modules that do I/O.
    for io in [
        "shell",
        "runtime",
        "context",
        "inbox",
        "outgoing",
        "delivery",
        "server_trust",
    ] {
        assert!(
            !edges["core"].contains(io),
            "the core must not import {io}: {:?}",
            edges["core"]
        );
    }
    // Depth-first search for a cycle.
    fn visit<'a>(
        module: &'a str,
        edges: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(start) = path.iter().position(|seen| *seen == module) {
            panic!("import cycle: {:?} → {module}", &path[start..]);
        }
        if done.contains(module) {
            return;
        }
        path.push(module);
        for next in &edges[module] {
            visit(next.as_str(), edges, path, done);
        }
        path.pop();
        done.insert(module);
    }
    let mut done = BTreeSet::new();
    for module in edges.keys() {
        visit(module, &edges, &mut Vec::new(), &mut done);
    }
}

#[test]
fn module_references_reads_use_groups_and_paths() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].map(str::to_owned).into();
    let source =
        "use crate::{a::X, b::{Y, Z}};\n// crate::d in a comment\nfn f() { crate::c::g(); }";
    let found = module_references(source, &modules);
    assert_eq!(found, ["a", "b", "c"].map(str::to_owned).into());
}

/// Regression: a folder's `mod.rs` that declares its tests (`#[cfg(test)] mod tests;`)
/// before its code had all that code left out of the import check.
#[test]
fn a_declared_test_module_hides_no_code() {
    let modules: BTreeSet<String> = ["a", "b"].map(str::to_owned).into();
    let declared = "mod part;\n#[cfg(test)]\nmod tests;\n\nuse crate::a::X;\n";
    assert_eq!(
        module_references(declared, &modules),
        ["a"].map(str::to_owned).into()
    );
    let inline = "use crate::a::X;\n\n#[cfg(test)]\nmod tests {\n    use crate::b::Y;\n}\n";
    assert_eq!(
        module_references(inline, &modules),
        ["a"].map(str::to_owned).into()
    );
}
