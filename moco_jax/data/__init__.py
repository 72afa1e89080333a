"""Input: TFDS datasets prepared (offline where possible), sharded per process, fed to the mesh."""
