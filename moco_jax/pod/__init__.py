"""Compiling a run for accelerators this machine does not have: a TPU slice from libtpu's
compile-only topologies (``topology``) or NVIDIA GPUs from the CUDA plugin's (``gpu_target``),
every jitted function of a run with its real shapes (``compile_targets``), and what the compiler
says of each: memory, FLOPs, collectives (``compiled_stats``), reported by ``compile_for``.

May import anything in the library; only the entry points (``train.py --compile_for``, the
benchmarks) import it.
"""
