"""usdet evaluation: penalized IoU, COCO AP, FROC, image-level ROC, bootstrap CIs, reports, plots.

``PenalizedIoUEvaluator`` (a detectron2 ``DatasetEvaluator``) is in
:mod:`usdet.evaluation.penalized_iou`; ``evaluate_predictions`` (metrics.json, report.md, plots)
in :mod:`usdet.evaluation.report`. Function names are not re-exported here on purpose, so that
``usdet.evaluation.penalized_iou`` always names the module.
"""
from .penalized_iou import PenalizedIoUEvaluator  # noqa: F401
