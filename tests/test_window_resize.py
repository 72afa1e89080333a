"""The resize on the device (``dataset.resize_on = "device"``), restated without the library.

The host then sends each image's decoded union of windows with the views' boxes inside it, and
``window_resize`` cuts and resizes on the device. A view must stay what the host made of it:
PIL's bilinear resize of the window alone (restated here in NumPy from Pillow's
``precompute_coeffs``), and within one grey level of the host's resized views for the same
``(seed, epoch, index)`` (``test_host_crops``' restatement).
"""

import numpy as np
import pytest
from test_host_crops import SIZE, _config, _photo, _reference, jpegs  # noqa: F401 (a fixture)

from moco_jax.data.host_crops import _tf
from moco_jax.data.streaming import crop_dataset
from moco_jax.data.window_resize import resize_window, resize_windows

BUFFER = 96


def _pil_weights(length, size):
    """``[size, length]``: Pillow's bilinear coefficients, loop for loop (``Resample.c``)."""
    scale = length / size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    weights = np.zeros((size, length))
    for out in range(size):
        centre = (out + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), length)
        row = [max(0.0, 1.0 - abs((x - centre + 0.5) / filterscale)) for x in range(low, high)]
        weights[out, low:high] = np.array(row) / sum(row)
    return weights


@pytest.mark.parametrize("box", [(7, 3, 80, 61), (0, 0, BUFFER, BUFFER), (50, 40, 12, 9)])
def test_a_view_is_the_window_alone_resized_as_pil_does(box):
    """Shrinking, whole buffer and enlarging: the window's pixels only (the buffer outside it is
    255, and would show), weighted as Pillow's coefficients in float64, rounded: equal but for
    float32 rounding at a half (at most 1 level, on under 0.5% of the values)."""
    rng = np.random.default_rng(0)
    buffer = np.full((BUFFER, BUFFER, 3), 255, np.uint8)
    top, left, h, w = box
    window = _photo(rng, h, w)
    buffer[top : top + h, left : left + w] = window
    got = np.asarray(resize_window(buffer, np.asarray(box, np.int32), SIZE)).astype(int)
    rows, cols = _pil_weights(h, SIZE), _pil_weights(w, SIZE)
    expected = np.einsum("ij,jlc,kl->ikc", rows, window.astype(np.float64), cols)
    expected = np.clip(np.round(expected), 0, 255)
    assert np.abs(got - expected).max() <= 1
    assert (got != expected).mean() < 0.005


def test_a_box_of_the_output_size_comes_back_unchanged():
    """How the host sends views it resized itself (unions larger than the buffer)."""
    rng = np.random.default_rng(1)
    buffer = rng.integers(0, 256, (2, BUFFER, BUFFER, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, SIZE, SIZE], [5, SIZE, SIZE, SIZE]], np.int32)
    got = np.asarray(resize_windows(buffer, boxes, SIZE))
    np.testing.assert_array_equal(got[0], buffer[0, :SIZE, :SIZE])
    np.testing.assert_array_equal(got[1], buffer[1, 5 : 5 + SIZE, SIZE : 2 * SIZE])


@pytest.mark.parametrize("epoch", [0, 3])
def test_views_resized_on_the_device_are_the_hosts(jpegs, epoch):  # noqa: F811
    """The pipeline with ``resize_on="device"``, then ``resize_windows``: the decoded windows
    resized (``test_host_crops``' restatement) within 1 level, on under 1% of the values, both
    for unions that travel as they are and for those too large for the buffer (resized on the
    host: equal)."""
    config = _config()
    config.dataset.resize_on, config.dataset.union_buffer = "device", BUFFER
    tf = _tf()
    labels = np.arange(len(jpegs), dtype=np.int32)
    records = tf.data.Dataset.from_tensor_slices((jpegs, labels)).enumerate()
    unions, boxes, order = next(crop_dataset(records, config, epoch, 0, 64).as_numpy_iterator())
    assert unions.shape[1:] == (BUFFER, BUFFER, 3) and boxes.shape[1:] == (2, 4)
    resized_on_host = np.all(boxes[:, :, 2:] == SIZE, axis=(1, 2)) & (boxes[:, 1, 1] == SIZE)
    assert 0 < resized_on_host.sum() < len(jpegs)  # both ways are exercised
    for row, index in enumerate(order):
        views = _reference(config, epoch, int(index), jpegs[index])
        for view in range(2):
            got = np.asarray(resize_window(unions[row], boxes[row, view], SIZE)).astype(int)
            diff = np.abs(got - views[view])
            assert diff.max() <= (0 if resized_on_host[row] else 1)
            assert (diff > 0).mean() < 0.01


def test_the_bf16_tails_survive_the_gpu_compiler():
    """XLA's GPU pipeline folds a ``f32 -> bf16 -> f32`` round trip back into the value (excess
    precision allowed), which turned every tail into ``x - x`` (views up to 2 levels off on a
    GPU); with the head rounded by ``reduce_precision`` the H100 program subtracts the head."""
    import re

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from test_gpu_target import needs_plugin

    from moco_jax.pod import topology

    if needs_plugin.args[0]:
        pytest.skip(needs_plugin.kwargs["reason"])
    mesh = Mesh(np.array(topology.topology_devices("h100:8").devices[:1]), ("d",))
    whole = NamedSharding(mesh, P())
    buffer = jax.ShapeDtypeStruct((BUFFER, BUFFER, 3), jnp.uint8, sharding=whole)
    box = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=whole)
    resize = jax.jit(lambda b, x: resize_window(b, x, SIZE), out_shardings=whole)
    program = resize.lower(buffer, box).compile().as_text()
    self_subtractions = re.findall(r"subtract\((%[\w.-]+), \1\)", program)
    assert "subtract(" in program and not self_subtractions


def test_resize_on_the_device_with_a_resident_dataset_is_a_warning(caplog):
    """Fashion-MNIST stays on the devices, which crop and resize it already: said once, and the
    run goes on."""
    from data_fixtures import fashion_mnist_data_dir

    from moco_jax.mesh import make_data_mesh
    from moco_jax.run.run_setup import load_data
    from tiny import tiny_config

    overrides = {"dataset.data_dir": fashion_mnist_data_dir(), "dataset.resize_on": "device"}
    with caplog.at_level("WARNING"):
        data = load_data(tiny_config(**overrides), make_data_mesh(8))
    said = [r.getMessage() for r in caplog.records if "applies to streamed" in r.getMessage()]
    assert len(said) == 1 and "fashion_mnist stays on the devices" in said[0]
    assert data.num_classes == 10
