"""HPL (High-Performance Linpack) in Python over MPI, and the cluster report.

    mpirun -np N --hostfile hostfile python -m hpl --n 15000 --nb 192     # FP64 Linpack
    mpirun -np N python -m hpl --dat hpl/HPL.dat                          # classic input file
    mpirun -np N python -m hpl.stream                                     # STREAM triad per node
    mpirun -np N --hostfile hostfile python -m hpl.compare --n 15000      # HPL + STREAM + LLM table

Modules: ``grid`` (P x Q grid, block-cyclic maps, test matrix), ``lu`` (the
factorization and solve), ``blas`` (in-place BLAS/LAPACK on strided views),
``dat`` (HPL.dat), ``driver`` (one checked, timed run and its output),
``stream`` (triad kernel), ``compare`` (the report).
"""
