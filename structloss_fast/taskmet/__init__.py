"""TaskMet family: batched conjugate gradients without host synchronisation, implicit
differentiation through an inner argmin, and task-driven Mahalanobis metric learning.

Layout: reference.py (the definitions), _ops.py (op registration and backends), cg.py,
implicit.py, metric.py (the Mahalanobis loss and metric networks), trainer.py, tasks.py.
Mathematics: docs/spec/taskmet.md.
"""
from .cg import CGNotConverged, CGResult, CGWarning, cg
from .implicit import custom_argmin, implicit_argmin, unrolled_argmin
from .metric import DiagonalMetricNet, MetricNet, mahalanobis_loss
from .trainer import TaskMetConfig, TaskMetTrainer

__all__ = [
    "CGNotConverged", "CGResult", "CGWarning", "cg", "mahalanobis_loss", "MetricNet", "DiagonalMetricNet",
    "implicit_argmin", "custom_argmin", "unrolled_argmin", "TaskMetConfig", "TaskMetTrainer",
]
