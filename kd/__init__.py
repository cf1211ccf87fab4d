"""kd: knowledge distillation of causal language models, run as sweeps on Ray.

The library is importable without Ray or MLflow; only :mod:`kd.sweep` imports Ray and
only :mod:`kd.tracking` imports MLflow.
"""

__version__ = "0.1.0"
