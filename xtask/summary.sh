#!/usr/bin/env bash
# Sums the per-binary "test result:" lines of a cargo test log into one closing line.
set -euo pipefail
log=${1:?usage: summary.sh CARGO_TEST_LOG}
awk '/^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($(i+1) ~ /^passed;?$/) p += $i;
         if ($(i+1) ~ /^failed;?$/) f += $i;
         if ($(i+1) ~ /^ignored;?$/) s += $i;
       }
     }
     END { printf "\nsummary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
# The Service conformance suite: one test per upstream `[sig-network] Services` behaviour, named
# `upstream_*`; ignored ones (not supported yet) count as not passing.
total=$(grep -cE '^test upstream_[a-z0-9_]+ \.\.\. ' "$log" || true)
if [ "${total:-0}" -gt 0 ]; then
  pass=$(grep -cE '^test upstream_[a-z0-9_]+ \.\.\. ok$' "$log" || true)
  printf '%s of %s upstream Service behaviours pass\n' "$pass" "$total"
fi
