#!/usr/bin/env bash
# Runs one cargo-fuzz target for a while: scripts/fuzz.sh TARGET [SECONDS]
# Targets: envelope_parse, request_handling. Needs only the stable
# toolchain: cargo-fuzz is installed into .tools/, and RUSTC_BOOTSTRAP=1
# lets stable rustc take the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: scripts/fuzz.sh TARGET [SECONDS]}"
seconds="${2:-600}"
if [ ! -x .tools/bin/cargo-fuzz ]; then
  cargo install --locked --root .tools cargo-fuzz
fi
mkdir -p "fuzz/corpus/$target"
export RUSTC_BOOTSTRAP=1
cd fuzz
# New inputs go to corpus/TARGET (git-ignored); the committed seeds are read too.
exec ../.tools/bin/cargo-fuzz run "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -print_final_stats=1
