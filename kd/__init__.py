"""kd: knowledge distillation of causal language models, run as sweeps on Ray.

The library is importable without Ray or MLflow; only :mod:`kd.sweep.driver` and the
modules it imports (search, trial, finalists, mlflow) import Ray, and only
:mod:`kd.tracking` imports MLflow. Nothing in ``kd`` imports ``analysis``; the ``kd``
command (the top) registers ``kd report``/``kd ui`` from :mod:`analysis.commands`.
"""

__version__ = "0.1.0"
