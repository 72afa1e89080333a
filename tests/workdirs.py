"""Reading a finished run's workdir back in tests: its last checkpoint's arrays, its records."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp


def final_arrays(workdir):
    """``(step, {key path: array})`` of the latest checkpoint's training state."""
    manager = ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)
    )
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    manager.close()
    return step, {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree.leaves_with_path(restored["state"])
    }


def records(workdir, name="epochs.jsonl"):
    """A records file's rows without their timings (``*_seconds``, ``images_per_sec``)."""
    rows = [json.loads(line) for line in (workdir / name).read_text().splitlines()]
    timing = lambda key: key.endswith("_seconds") or key == "images_per_sec"
    return [{k: v for k, v in row.items() if not timing(k)} for row in rows]


def assert_same_final_state(workdir, expected_workdir, steps):
    """Both runs ended at ``steps`` with bit-for-bit the same arrays and epoch records."""
    step, arrays = final_arrays(workdir)
    expected_step, expected = final_arrays(expected_workdir)
    assert step == expected_step == steps
    assert arrays.keys() == expected.keys()
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)
    assert records(workdir) == records(expected_workdir)
