//! The container image (no Docker engine here or on CI): its build stage
//! must copy everything `cargo build --locked` reads, or `docker build`
//! breaks unnoticed.

use std::collections::HashSet;

use crate::common::repo_root;

/// Every build input of the crate and every path dependency or workspace
/// member named in Cargo.toml (bench among them) is copied.
#[test]
fn dockerfile_copies_every_build_input() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let copied: HashSet<String> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|args| !args.starts_with("--from"))
        .flat_map(|args| {
            let parts: Vec<&str> = args.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|p| p.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let mut needed: Vec<String> = [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "proto",
        "migrations",
        "src",
    ]
    .map(str::to_owned)
    .to_vec();
    // path = "…", members = ["bench"]: their top-level folder.
    for line in manifest.lines() {
        let paths = line
            .split("path = \"")
            .skip(1)
            .chain(line.strip_prefix("members = ["));
        for rest in paths {
            let path = rest
                .trim_start_matches('"')
                .split('"')
                .next()
                .unwrap_or_default();
            if let Some(top) = path
                .split('/')
                .next()
                .filter(|t| !t.is_empty() && *t != "..")
            {
                needed.push(top.to_owned());
            }
        }
    }
    assert!(needed.contains(&"bench".to_owned()), "{needed:?}");
    for path in &needed {
        assert!(
            copied.contains(path),
            "the Dockerfile's build stage does not COPY {path} (copied: {copied:?})"
        );
    }
}
