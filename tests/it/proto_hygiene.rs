//! The public contract stays clean and compatible: `buf lint` (STANDARD,
//! exceptions documented in buf.yaml) and `buf breaking` against the
//! previous commit, with the real buf from npm's @bufbuild/buf.

use std::process::{Command, Output};

use crate::common::{repo_root, tool};

fn buf(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(tool("buf", "KEYBROKER_TEST_BUF"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn buf_lint_is_clean() {
    let out = buf(&["lint"], &repo_root());
    assert!(out.status.success(), "buf lint:\n{}", text(&out));
}

#[test]
fn no_breaking_change_since_the_previous_commit() {
    let root = repo_root();
    // The previous commit, or HEAD in a clone of depth 1.
    let has_parent = Command::new("git")
        .args(["rev-parse", "--verify", "--quiet", "HEAD~1"])
        .current_dir(&root)
        .output()
        .is_ok_and(|o| o.status.success());
    let against = format!(
        ".git#ref={},subdir=proto",
        if has_parent { "HEAD~1" } else { "HEAD" }
    );
    let out = buf(&["breaking", "--against", &against], &root);
    assert!(
        out.status.success(),
        "buf breaking against {against}:\n{}",
        text(&out)
    );
}

/// The breaking check is real: renumbering a field of the committed
/// contract is reported.
#[test]
fn buf_breaking_reports_a_renumbered_field() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("proto/keybroker/v1");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["broker.proto", "admin.proto"] {
        let original =
            std::fs::read_to_string(repo_root().join("proto/keybroker/v1").join(file)).unwrap();
        let changed = original.replace("string tenant_id = 2;", "string tenant_id = 12;");
        std::fs::write(copy.join(file), changed).unwrap();
    }
    std::fs::write(
        dir.path().join("buf.yaml"),
        "version: v2\nmodules:\n  - path: proto\nbreaking:\n  use: [FILE]\n",
    )
    .unwrap();
    let against = repo_root().join("proto");
    let out = buf(
        &["breaking", "--against", against.to_str().unwrap()],
        dir.path(),
    );
    assert!(
        !out.status.success(),
        "a renumbered field passed buf breaking"
    );
    assert!(text(&out).contains("tenant_id"), "{}", text(&out));
}
