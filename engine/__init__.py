"""Switchboard engine: answers Twilio calls over bidirectional Media Streams."""

import os

# numpy's BLAS (the knowledge retrieval's and the FAQ's sentence embeddings) would start a
# thread per core for every matrix product, competing with the event loop and the speech
# models' own bounded pools: one embedding then took 0.3-0.9 s on a busy 2-core machine
# instead of 20-40 ms (bench/bench_knowledge.py). Read when numpy loads, so set here,
# before any engine module imports it; an operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
