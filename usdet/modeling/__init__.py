"""usdet's detectron2 model components (registered on import): ignore-region-aware RPN and ROI
heads, and a basic-block ResNet-FPN of any width."""
from .backbone import build_slim_resnet_fpn_backbone  # noqa: F401
from .ignore_regions import UsdetROIHeads, UsdetRPN  # noqa: F401
