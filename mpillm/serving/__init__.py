"""Rank 0's request side: scheduling, sampling, speculative drafting, chat formats, HTTP.

Nothing here calls MPI: the engine (mpillm.runtime) does, in rank 0's main thread."""
