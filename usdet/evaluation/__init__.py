"""usdet evaluation: penalized IoU, COCO AP, FROC, image-level ROC, bootstrap CIs, reports, plots.

``PenalizedIoUEvaluator`` and ``CleanCOCOEvaluator`` (detectron2 ``DatasetEvaluator``s) live in
:mod:`usdet.evaluation.evaluator`, imported only there so that offline scoring does not import
detectron2; ``evaluate_predictions`` (metrics.json,
report.md, plots) is in :mod:`usdet.evaluation.report`. Function names are not re-exported here
on purpose, so that ``usdet.evaluation.penalized_iou`` always names the module.
"""
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "PenalizedIoUEvaluator":
        from .evaluator import PenalizedIoUEvaluator

        return PenalizedIoUEvaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
