"""Weights across the PyTorch border, without running a file's code, in layers that a file
goes through one way (``.importlinter`` holds each module to its layer):

- ``init_from``: start a run from another run's or a file's encoder; ``architecture``: the
  backbone a file holds (for linear evaluation);
- ``formats``: the kinds of file (torchvision and timm state dicts, official MoCo v1/v2/v3
  checkpoints, DeiT, detectron2): which one a file is, and each one's layout;
- ``names_encoder`` (a whole encoder: backbone, projection head, MoCo v3's predictor) on
  ``names_resnet`` (torchvision's ResNet names) and ``names_vit`` (timm's ViT names);
  ``torch_files``: reading and writing the files, the only module that imports torch;
- ``arrays``: a tensor as a checked numpy array, and each framework's layout of it;
- ``errors``: ``WeightBridgeError``, which loads no JAX.

May import: ``models``, ``config``, ``run``'s checkpoint reading, the root modules; ``torch``
only in ``torch_files``, at the moment a ``.pth`` is read or written.
"""
