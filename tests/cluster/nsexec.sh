#!/bin/sh
# An ssh stand-in for PRRTE (--prtemca plm_ssh_agent): "nsexec.sh [ssh options] HOST COMMAND..."
# runs COMMAND in the network namespace of emulated host HOST, with that host's own hostname.
# HOST is an address 10.213.57.N (or a name hN); it maps to namespace ${MPILLM_NETNS_PREFIX}h(N-1).
set -eu
while [ $# -gt 0 ]; do
  case "$1" in
    -x|-T|-a|-n|-q) shift ;;        # ssh flags PRRTE may add: ignore
    -o|-p|-l|-i) shift 2 ;;
    *) break ;;
  esac
done
host="$1"; shift
: "${MPILLM_NETNS_PREFIX:?nsexec.sh: MPILLM_NETNS_PREFIX is not set (run through tests/cluster/netns.py)}"
base="${MPILLM_NETNS_SUBNET_BASE:-10.213.57}"
case "$host" in
  "$base".*) idx=$(( ${host##*.} - 1 )) ;;
  h[0-9]*) idx="${host#h}" ;;
  *) echo "nsexec.sh: unknown emulated host $host" >&2; exit 255 ;;
esac
ns="${MPILLM_NETNS_PREFIX}${idx}"
# Like ssh: the remaining words form one command line for a shell on the remote host.
exec ip netns exec "$ns" unshare --uts sh -c "hostname h$idx && $*"
