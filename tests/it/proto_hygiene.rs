//! The public contract stays clean and compatible: `buf lint` (STANDARD,
//! exceptions documented in buf.yaml) and `buf breaking` against the
//! released contract (a committed buf image), with the real buf from npm's
//! @bufbuild/buf.

use prost::Message as _;
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

/// The released contract, as a buf image committed beside the protos
/// (`contract/keybroker-v1.binpb`; rebuilt with `buf build proto -o
/// contract/keybroker-v1.binpb --exclude-source-info` only when a release
/// deliberately changes the contract). Independent of git history, so it
/// holds in a shallow clone too.
const BASELINE: &str = "contract/keybroker-v1.binpb";

#[test]
fn no_breaking_change_against_the_released_contract() {
    let root = repo_root();
    let baseline = root.join(BASELINE);
    // The baseline really is the contract (not an empty image that any
    // change would pass against).
    let image =
        prost_types::FileDescriptorSet::decode(std::fs::read(&baseline).unwrap().as_slice())
            .unwrap();
    let files: Vec<&str> = image
        .file
        .iter()
        .filter_map(|f| f.name.as_deref())
        .collect();
    for expected in ["keybroker/v1/broker.proto", "keybroker/v1/admin.proto"] {
        assert!(
            files.contains(&expected),
            "{BASELINE} lacks {expected}: {files:?}"
        );
    }
    let out = buf(&["breaking", "--against", BASELINE], &root);
    assert!(
        out.status.success(),
        "buf breaking against {BASELINE}:\n{}",
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
    let vendored = dir.path().join("proto/google/rpc");
    std::fs::create_dir_all(&vendored).unwrap();
    std::fs::copy(
        repo_root().join("proto/google/rpc/status.proto"),
        vendored.join("status.proto"),
    )
    .unwrap();
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
