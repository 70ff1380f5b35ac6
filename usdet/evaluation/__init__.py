"""usdet evaluation: penalized IoU, COCO AP, FROC, image-level ROC, bootstrap CIs, reports, plots.

Submodules import lazily what they need; ``PenalizedIoUEvaluator`` (a detectron2
``DatasetEvaluator``) lives in :mod:`usdet.evaluation.penalized_iou` and ``evaluate_predictions``
in :mod:`usdet.evaluation.report`.
"""
from .penalized_iou import PenalizedIoUEvaluator, penalized_iou  # noqa: F401


def evaluate_predictions(*args, **kwargs):  # noqa: D103 - thin re-export, see report.evaluate_predictions
    from .report import evaluate_predictions as _evaluate

    return _evaluate(*args, **kwargs)
