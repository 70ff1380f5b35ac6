"""usdet training engine: ``Trainer`` (detectron2 ``DefaultTrainer`` subclass), ``setup``, hooks, checkpointer."""
from .checkpoint import UsdetCheckpointer  # noqa: F401
from .hooks import BestModelHook, EMAHook, ValidationLossHook  # noqa: F401
from .setup import build_config, check_datasets, setup  # noqa: F401
from .trainer import Trainer, TrainingDivergedError, evaluate_checkpoint  # noqa: F401

from usdet.data.register import ensure_usdet_datasets  # noqa: E402

ensure_usdet_datasets()  # $USDET_DATASETS/<dataset>/annotations/<split>.json -> <dataset>_<split>
