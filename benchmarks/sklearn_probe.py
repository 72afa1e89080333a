"""Independent linear probes with scikit-learn on Fashion-MNIST (docs/evaluation.md):
``LogisticRegression`` on standardised raw pixels, and on the standardised pooled features of a
pretrained encoder (unaugmented images, BN in evaluation mode)::

    python -m benchmarks.sklearn_probe --pretrained PRETRAIN_WORKDIR [--json out.json]

Needs scikit-learn (a test extra). Takes a few minutes on a 2-core CPU (60k x 784 pixels).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def _fit_score(train_x, train_y, test_x, test_y, max_iter: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return 100 * model.score(scaler.transform(test_x), test_y)


def _features(setup, state, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    mean, std = setup.config.dataset.mean[0], setup.config.dataset.std[0]
    apply = jax.jit(lambda v, x: setup.algorithm.model.apply(v, x, train=False)[0])
    floats = (images.astype(np.float32) / 255 - mean) / std
    variables = setup.algorithm.encoder_variables(state)
    return np.concatenate(
        [np.asarray(apply(variables, floats[i : i + batch])) for i in range(0, len(floats), batch)]
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", help="a pretraining workdir (or .pth) to probe")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import moco_jax
    from configs import linear_fashion_mnist
    from moco_jax.data.tfds_source import load_arrays, prepared_builder
    from moco_jax.interop.init_from import load_encoder_weights
    from moco_jax.run.linear_eval import with_pretrained

    builder = prepared_builder("fashion_mnist", args.data_dir)
    (train_x, train_y), (test_x, test_y) = (load_arrays(builder, s) for s in ("train", "test"))
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64)
    start = time.time()
    result = {"pixels_top1": _fit_score(flat(train_x), train_y, flat(test_x), test_y, 1000)}
    result["pixels_seconds"] = time.time() - start
    print(result, flush=True)
    if args.pretrained:
        config = with_pretrained(linear_fashion_mnist.get_config(), args.pretrained)
        config.dataset.data_dir = args.data_dir
        setup = moco_jax.build(config, 1, devices=jax.devices()[:1])
        state = load_encoder_weights(config.init_from, setup.initial_state(), setup)
        start = time.time()
        train_f, test_f = _features(setup, state, train_x), _features(setup, state, test_x)
        result["features_top1"] = _fit_score(train_f, train_y, test_f, test_y, 2000)
        result["features_seconds"] = time.time() - start
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
