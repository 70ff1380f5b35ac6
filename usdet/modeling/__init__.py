"""usdet's detectron2 model components (registered on import): ignore-region-aware RPN and ROI heads."""
from .ignore_regions import UsdetROIHeads, UsdetRPN  # noqa: F401
