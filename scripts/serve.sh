#!/usr/bin/env bash
# Start the server on every rank with settings from the environment (the systemd unit in deploy/):
#   MPILLM_NP (default 2) ranks, MPILLM_HOSTFILE (default: none, all local), MPILLM_SERVE_ARGS (more
#   mpillm.serve options, e.g. "--port 8080 --model /srv/models/llama"), and the API key file
#   MPILLM_API_KEY_FILE (default: the systemd credential "api-key", when there is one).
# Arguments are passed to mpillm.serve too.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$MPILLM_ROOT"
key=()
kf="${MPILLM_API_KEY_FILE:-${CREDENTIALS_DIRECTORY:+$CREDENTIALS_DIRECTORY/api-key}}"
if [ -n "$kf" ] && [ -s "$kf" ]; then key=(--api-key-file "$kf"); fi
hf=()
if [ -n "${MPILLM_HOSTFILE:-}" ]; then hf=(--hostfile "$MPILLM_HOSTFILE"); fi
# shellcheck disable=SC2086  # MPILLM_SERVE_ARGS is a list of options
exec mpirun -np "${MPILLM_NP:-2}" "${hf[@]}" --bind-to none python -m mpillm.serve "${key[@]}" ${MPILLM_SERVE_ARGS:-} "$@"
