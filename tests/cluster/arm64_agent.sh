#!/bin/sh
# PRRTE's ssh stand-in (--prtemca plm_ssh_agent) for emulated clusters with arm64 hosts:
# see agent() in tests/cluster/arm64.py.
exec python3 "$(dirname "$0")/arm64.py" agent "$@"
