#!/usr/bin/env bash
# The engine across 2 and 4 emulated hosts at each link profile (root; see scripts/netns_bench.py).
#   sudo scripts/netns_bench.sh [--hosts 2 4] [--profiles 1gbe 10gbe] [--max-tokens 32] [--json out.json]
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec python "$MPILLM_ROOT/scripts/netns_bench.py" "$@"
