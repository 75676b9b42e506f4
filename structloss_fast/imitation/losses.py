"""The layer-imitation loss of Go Wide, Then Narrow (docs/spec/imitation.md): the thin network's
adapted block outputs against the wide network's block outputs, every prefix at once."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from .. import _oplib, _registry, _validate
from .._module import LossModule
from . import _ops
from . import reference as _ref

__all__ = ["layer_imitation_loss", "LayerImitationLoss"]

Reduction = Union[str, Sequence[str]]


def check_layers(student_outputs, teacher_outputs) -> tuple[list[Tensor], list[Tensor]]:
    """Validated lists of the two networks' block outputs (same length, shapes, dtype, device)."""
    for name, value in (("student_outputs", student_outputs), ("teacher_outputs", teacher_outputs)):
        if isinstance(value, Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors (one per layer), got {type(value).__name__}")
    student, teacher = list(student_outputs), list(teacher_outputs)
    if not student:
        raise ValueError("student_outputs must hold at least one layer's output")
    if len(teacher) != len(student):
        raise ValueError(f"teacher_outputs must have one tensor per layer of student_outputs ({len(student)}), "
                         f"got {len(teacher)}")
    dtype = None
    for i, (s, t) in enumerate(zip(student, teacher)):
        _validate.tensor(f"student_outputs[{i}]", s, floating=True)
        _validate.tensor(f"teacher_outputs[{i}]", t, floating=True)
        if t.shape != s.shape:
            raise ValueError(f"teacher_outputs[{i}] must have the shape of student_outputs[{i}] {tuple(s.shape)}, "
                             f"got shape {tuple(t.shape)}")
        dtype = s.dtype if dtype is None else dtype
        for name, u in ((f"student_outputs[{i}]", s), (f"teacher_outputs[{i}]", t)):
            if u.dtype != dtype:
                raise TypeError(f"{name} must have the dtype of student_outputs[0] ({dtype}), got {u.dtype}")
    _validate.same_device(**{f"student_outputs[{i}]": s for i, s in enumerate(student)},
                          **{f"teacher_outputs[{i}]": t for i, t in enumerate(teacher)})
    return student, teacher


def check_weights(weights, n_layers: int) -> list[float]:
    if weights is None:
        return [1.0] * n_layers
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence):
        raise TypeError("weights must be a list or tuple of Python numbers (one per layer), "
                        f"got {type(weights).__name__}")
    if len(weights) != n_layers:
        raise ValueError(f"weights must have one entry per layer ({n_layers}), got {len(weights)}")
    return [_validate.number(f"weights[{i}]", w, lo=0.0) for i, w in enumerate(weights)]


def check_reductions(reduction: Reduction, n_layers: int) -> list[str]:
    allowed = _ref.REDUCTIONS
    if isinstance(reduction, str):
        reductions = [reduction] * n_layers
    elif isinstance(reduction, Sequence):
        if len(reduction) != n_layers:
            raise ValueError(f"reduction must be one string or one per layer ({n_layers}), got {len(reduction)}")
        reductions = list(reduction)
    else:
        raise TypeError(f"reduction must be a string or a sequence of strings, got {type(reduction).__name__}")
    for r in reductions:
        if r not in allowed:
            raise ValueError(f"reduction must be one of {allowed} (or a sequence of them, one per layer), got {r!r}")
    return reductions


def layer_imitation_loss(
    student_outputs: Sequence[Tensor],
    teacher_outputs: Sequence[Tensor],
    *,
    weights: Optional[Sequence[float]] = None,
    reduction: Reduction = "mean",
    per_layer: bool = False,
    backend: str = "auto",
) -> Tensor:
    """sum_i w_i * R_i((s_i - t_i)^2) over the layers i, in one pass over all of them.

    Args:
        student_outputs: the thin network's adapted block outputs a_1..a_n (every prefix of the
            adapted network, in the wide network's feature space), any shapes.
        teacher_outputs: the wide network's block outputs b_1..b_n, shapes equal to the
            student's layer by layer (usually computed under no_grad; a teacher that requires
            grad gets the opposite gradient). One floating dtype and one device for all.
        weights: per-layer weights w_i >= 0 (Python numbers; default 1 each).
        reduction: per-layer reduction R_i of the squared errors: "mean" (over the layer's
            elements, F.mse_loss's mean; 0 for an empty layer), "sum", or "batchmean" (the sum
            divided by the size of dim 0); one string for all layers or one per layer.
        per_layer: return the (L,) vector of the weighted terms (their sum is the loss).
        backend: "auto" | "reference" | "cpu".

    Returns a 0-d tensor (or (L,) with per_layer) in the inputs' dtype; non-finite inputs give
    a non-finite result. The compiled kernel accumulates in float64 and keeps no temporaries;
    double backward is exact.
    """
    student, teacher = check_layers(student_outputs, teacher_outputs)
    weights = check_weights(weights, len(student))
    reductions = check_reductions(reduction, len(student))
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
    chosen = _registry.resolve(_ops.OP, backend, student[0].device)
    dtype = _oplib.loss_dtype(student[0])  # float32 under autocast, as F.mse_loss
    if chosen == "reference":
        student, teacher = list(_oplib.loss_inputs(*student)), list(_oplib.loss_inputs(*teacher))
        with _oplib.autocast_off(student[0].device):
            return _ref.layer_imitation_loss(student, teacher, weights, reductions, per_layer).to(dtype)
    scales = [w / _ref.divisor(s, r) for s, w, r in zip(student, weights, reductions)]
    return _ops.reduce(_ops.run(chosen, student, teacher), scales, dtype, per_layer)


class LayerImitationLoss(LossModule):
    """Module form of layer_imitation_loss: forward(student_outputs, teacher_outputs)."""

    _function = layer_imitation_loss
    _options = ("weights", "reduction", "per_layer", "backend")

    def __init__(self, weights: Optional[Sequence[float]] = None, *, reduction: Reduction = "mean",
                 per_layer: bool = False, backend: str = "auto"):
        if weights is not None:
            check_weights(weights, len(weights) if isinstance(weights, Sequence) else -1)
        if isinstance(reduction, str):
            check_reductions(reduction, 1)
        else:
            check_reductions(reduction, len(reduction) if isinstance(reduction, Sequence) else -1)
        super().__init__(weights=None if weights is None else [float(w) for w in weights], reduction=reduction,
                         per_layer=per_layer, backend=backend)
