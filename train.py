"""Pretrain MoCo: python train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...].

The command itself is moco_jax/train.py (also python -m moco_jax.train, or moco-train once the
package is installed with pip install -e .); this file keeps the short command of the README.
"""

from moco_jax.train import run

if __name__ == "__main__":
    run()
