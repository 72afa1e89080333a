"""The PyTorch re-statement of the official MoCo step used by the parity tests.

It lives in the package (``moco_jax/torch_reference.py``) so that the benchmark's side-by-side
run (``python -m moco_jax.benchmark --torch``) times exactly the code these tests check.
"""

from moco_jax.torch_reference import (  # noqa: F401
    BasicBlock,
    CifarResNet18,
    MoCo,
    SplitBatchNorm,
    cosine_learning_rate,
    train_step,
)
