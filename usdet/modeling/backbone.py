"""A basic-block ResNet-FPN of any width, registered as ``build_slim_resnet_fpn_backbone``.

detectron2's ``build_resnet_backbone`` fixes R18/R34 at 64 channels in res2. On a 2-core CPU
the backbone is most of a light detector's cost, and breast lesions are large, so a narrower
network that sees more images in the same time is the better trade (issue 21). This builder
takes the same keys (``MODEL.RESNETS.DEPTH`` 18/34, ``STEM_OUT_CHANNELS``, ``RES2_OUT_CHANNELS``,
doubled at each stage, ``NORM``, ``OUT_FEATURES``, ``MODEL.BACKBONE.FREEZE_AT``) and detectron2's
own ``ResNet``, ``BasicBlock``, ``BasicStem`` and ``FPN`` modules, so checkpoints, export and
Grad-CAM see ordinary detectron2 layers.
"""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = ["build_slim_resnet", "build_slim_resnet_fpn_backbone"]

_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def build_slim_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """Basic-block ResNet (depth 18/34) with ``RES2_OUT_CHANNELS`` channels in res2, doubling per stage."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS:
        raise ValueError(f"build_slim_resnet_fpn_backbone: MODEL.RESNETS.DEPTH must be 18 or 34, got {r.DEPTH}")
    if r.RES5_DILATION != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("build_slim_resnet_fpn_backbone: no dilation or deformable convolution")
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    names = ["res2", "res3", "res4", "res5"]
    last = max(names.index(f) for f in r.OUT_FEATURES if f in names) + 1
    stages, in_ch, out_ch = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for i, n in enumerate(_BLOCKS[r.DEPTH][:last]):
        stride = 1 if i == 0 else 2
        stages.append(ResNet.make_stage(BasicBlock, n, in_channels=in_ch, out_channels=out_ch,
                                        stride_per_block=[stride] + [1] * (n - 1), norm=r.NORM))
        in_ch, out_ch = out_ch, out_ch * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_slim_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """``build_slim_resnet`` under detectron2's FPN (``MODEL.FPN.*``; P6 by max-pooling the top level)."""
    return FPN(bottom_up=build_slim_resnet(cfg, input_shape), in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(),
               fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
