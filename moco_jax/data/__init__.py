"""Input: TFDS datasets prepared (offline where possible), sharded per process, fed to the mesh."""

import os

# TensorFlow (imported by TFDS) only reads files here: keep its start-up logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
