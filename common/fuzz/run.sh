#!/usr/bin/env bash
# A short, bounded fuzz run of im-common's decoders: each target for N seconds (default 30).
#
#   common/fuzz/run.sh [seconds] [target...]      e.g. common/fuzz/run.sh 60 frame_decoder
#
# Installs cargo-fuzz when it is missing. cargo fuzz passes nightly-only flags (-Zsanitizer=address,
# coverage instrumentation); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them, so no nightly is
# needed. Not part of CI (the first build takes minutes); the same checks run on every `cargo test` as
# property tests (common/tests/properties.rs). Each target keeps its growing corpus in
# corpus/<target> (git-ignored) and starts from the committed seeds/<target>; a crash is written to
# artifacts/<target>/ and makes this script exit non-zero: reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-…   (from common/)
# then fix the bug and keep the input as a regression test.
set -euo pipefail

seconds="${1:-30}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(frame_decoder config_loader record_decoder)
fi

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir/.."   # cargo fuzz looks for ./fuzz

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
failed=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "== $target: ${seconds}s" >&2
    # -max_len 4096: frames, configs and records worth fuzzing are small; longer inputs only slow it.
    if ! cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -dict="fuzz/dict/$target.dict" -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: crash or error in: ${failed[*]} (see common/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${targets[*]} ran ${seconds}s each without a crash" >&2
