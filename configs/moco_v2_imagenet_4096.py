"""MoCo v2 on ImageNet at batch 4096, for slices and clusters of 16 to 256 devices (256 to 16
images a device): moco_v2_imagenet.py with the batch 16x the paper's 256 and the learning rate
scaled with it (base_lr is per 256 images: 0.03 x 16 = 0.48; Goyal et al.'s linear scaling
rule). K stays 65536: 16 steps of keys. Shuffle-BN exchanges keys within groups of 8 devices
(model.shuffle_group_devices), so the per-device batch must be a multiple of 8 (any of 16-512
devices). The paper's own setting, 256 on 8 GPUs or chips (32 a device), is moco_v2_imagenet.py.
"""

from configs import moco_v2_imagenet


def get_config():
    config = moco_v2_imagenet.get_config()
    config.batch_size = 4096
    return config
