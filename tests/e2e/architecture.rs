//! The dependency direction of ARCHITECTURE.md, read from the crates' manifests.

use std::{collections::BTreeMap, process::Command};

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
