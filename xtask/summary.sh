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
# `upstream_*`, counted against the list of every upstream data-plane behaviour in the test file
# (UPSTREAM_BEHAVIOURS): a behaviour without a test, or whose test is ignored or fails, does not
# pass. Printed when the log has conformance results at all.
if grep -qE '^test upstream_[a-z0-9_]+ \.\.\. ' "$log"; then
  list="$(dirname "$0")/../tests/tests/conformance.rs"
  names=$( { sed -n '/^const UPSTREAM_BEHAVIOURS/,/^];/p' "$list" | grep -oE '"upstream_[a-z0-9_]+"' | tr -d '"'
             grep -oE '^test upstream_[a-z0-9_]+ ' "$log" | cut -d' ' -f2; } | sort -u)
  total=0; pass=0; missing=()
  for n in $names; do
    total=$((total + 1))
    if grep -qxE "test $n \.\.\. ok" "$log"; then
      pass=$((pass + 1))
    else
      missing+=("$n")
    fi
  done
  printf '%s of %s upstream Service behaviours pass\n' "$pass" "$total"
  if [ ${#missing[@]} -gt 0 ]; then
    printf 'not passing (no test, ignored or failed): %s\n' "${missing[*]}"
  fi
fi
