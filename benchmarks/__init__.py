"""The benchmark harness, kept out of the runtime package: ``benchmarks.compare`` (mpillm against
STREAM and llama.cpp in one run) and ``benchmarks.baseline`` (llama.cpp driven in its own venv).
The engine's own benchmark stays in ``mpillm.bench``."""
