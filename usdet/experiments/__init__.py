"""usdet experiments: studies built from several training and evaluation runs.

Cross-evaluation (several models x several datasets, :mod:`usdet.experiments.cross_eval`) and
k-fold cross-validation (:mod:`usdet.experiments.crossval`). They sit above both the engine
(training, ``--eval-only``) and the evaluation (scoring, reports), so that neither of those
imports the other back. Importing this package imports nothing.
"""
