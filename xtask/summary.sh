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
