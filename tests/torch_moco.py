"""The PyTorch re-statement of the official MoCo step used by the parity tests.

It lives with the benchmarks (``benchmarks/torch_reference.py``), outside the library, so that
the benchmark's side-by-side run (``python -m benchmarks --torch``) times exactly the code these
tests check.
"""

from benchmarks.torch_reference import (  # noqa: F401
    BasicBlock,
    CifarResNet18,
    MoCo,
    SplitBatchNorm,
    cosine_learning_rate,
    train_step,
)
