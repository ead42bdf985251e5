# Sourced by the project's scripts: where the venv lives and what Open MPI needs.
MPILLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MPILLM_ROOT
export MPILLM_VENV="${MPILLM_VENV:-$MPILLM_ROOT/.venv}"
export PATH="$MPILLM_VENV/bin:$PATH"
# Open MPI refuses to run as root unless told twice.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Allow more ranks than cores on a laptop-sized machine (Open MPI 5 / PRRTE).
export PRTE_MCA_rmaps_default_mapping_policy="${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}"
