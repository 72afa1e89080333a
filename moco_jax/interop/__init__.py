"""Weights across the PyTorch border, without running a file's code: tensor names and array
layouts (``torch_bridge``: torchvision ResNets; ``vit_names``: timm ViTs; ``torch_encoders``:
whole encoders and MoCo v3's heads), whole files (``torch_formats``: torchvision, detectron2,
official MoCo and moco-v3 checkpoints, DeiT), a file's architecture (``torch_architecture``) and
starting a run from another run's or a file's encoder (``init_from``).

May import: ``models``, ``config``, ``run``'s checkpoint reading, the root modules; ``torch``
only where a ``.pth`` is read or written, at that moment.
"""
