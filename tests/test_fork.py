"""A fork's backbone from a module of its own, named by ``config.imports``, with no edit to the
package: imported before the config is checked, it trains; what cannot be imported, a backbone
nobody registered, and exporting or loading PyTorch weights into a backbone without PyTorch names
are each one error naming it."""

import math
import sys

import pytest

from moco_jax import export
from moco_jax.config.checks import ConfigError
from moco_jax.config.validation import validate_config
from moco_jax.interop.init_from import load_encoder_weights
from tiny import build, image_batches, run_steps, tiny_config

FORK = {"imports": "fork_backbone", "model.backbone": "fork_tiny_net"}  # tests/fork_backbone.py


@pytest.fixture(scope="module")
def fork_run():
    config = tiny_config(**FORK)
    return config, *build(config, 2)


def test_a_forks_backbone_registers_from_config_imports_and_trains(fork_run):
    config, setup, state = fork_run
    assert "fork_backbone" in sys.modules  # imported by the config check, not by this test
    _, history = run_steps(setup, state, image_batches(config, 2))
    assert all(math.isfinite(h["loss"]) for h in history)


def test_a_module_that_cannot_be_imported_is_named():
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_fork'"):
        validate_config(tiny_config(imports="fork_backbone, no_such_fork"), 1)


def test_an_unregistered_backbone_is_named_with_the_way_to_register_it():
    with pytest.raises(ConfigError, match="unknown backbone 'nobody_net'.*--config.imports="):
        validate_config(tiny_config(**{"model.backbone": "nobody_net"}), 1)


def _workdir(tmp_path, config):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(config.to_json_best_effort())
    return str(tmp_path / "run")


def test_export_names_a_backbone_it_has_no_pytorch_names_for(tmp_path):
    """Refused from config.json alone, before a checkpoint is read (or torch is needed)."""
    workdir = _workdir(tmp_path, tiny_config(**FORK))
    with pytest.raises(ConfigError, match="backbone 'fork_tiny_net' has no PyTorch layout"):
        export.export_weights(workdir, "torchvision", str(tmp_path / "out.pth"))


def test_export_of_a_run_whose_backbone_nobody_registered_names_it(tmp_path):
    """(Its module not named in the saved config: the registry knows the name only once a module
    registers it.)"""
    workdir = _workdir(tmp_path, tiny_config(**{"model.backbone": "unregistered_net"}))
    with pytest.raises(ConfigError, match="unknown backbone 'unregistered_net'"):
        export.export_weights(workdir, "detectron2", str(tmp_path / "out.pkl"))


def test_a_weights_file_into_a_forks_backbone_is_refused_before_it_is_read(fork_run, tmp_path):
    _, setup, state = fork_run
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="backbone 'fork_tiny_net' has no PyTorch names"):
        load_encoder_weights(str(weights), state, setup)
