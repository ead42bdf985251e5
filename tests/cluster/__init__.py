"""Cluster test helpers: emulated hosts (netns.py) and a single-node Slurm (slurm.py)."""
