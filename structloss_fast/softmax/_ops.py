"""Op glue of the row-softmax family: the registration of structloss_fast::softmax_loss and
::linear_softmax_loss (fake kernels, autograd, Triton twins; CPU kernels in
csrc/cpu/softmax.cpp), their backends, and the one reduction of the row statistics.

The ops return per-row statistics (SoftmaxStat columns, ids.h), the row loss among them; `reduce`
below turns them into the loss for every backend alike, and autograd hands the backward the
gradient of each row's loss ("row weights") as the gradient of that column.

The forward writes the gradient whenever a backward will follow (compute_grad / grad_mask).
softmax_loss: the (N, C) buffer holds each row's own gradient and the backward scales it in
place by the row weights, so no second N x C buffer is made; a second backward through the
same graph (retain_graph=True), a differentiable backward (create_graph=True) or a graph traced
by torch.compile recompute it from the saved row statistics, or scale out of place.
linear_softmax_loss: the forward accumulates the gradients of the unit-weight sum of the row
losses, (N, H), (C, H) and (C,), which the backward scales out of place.

softmax_loss also takes class-probability targets (N, C) (identity transform only): the row loss
is then sum_j c_j f_j with c_j = w_j ((1 - ls) t_j + ls / C), and the gradient with respect to
the targets, (1 - ls) w_j f_j per row weight, is formed here from the saved log-sum-exp.

Higher-order gradients (create_graph=True) are exact: the gradient is then the reference's, in
differentiable torch ops on the op's own inputs (dense N x C, as the reference is).
Under autocast the ops compute where F.cross_entropy and F.linear would: the loss in float32,
the fused linear's products in the autocast dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _oplib, _registry
from .._ids import ProxyAnchorStat, SoftmaxParam, SoftmaxPool, SoftmaxStat, SoftmaxTransform
from . import reference as _ref

OP = "softmax_loss"
LINEAR_OP = "linear_softmax_loss"
POOLED_OP = "pooled_linear_softmax_loss"
PROXY_ANCHOR_OP = "proxy_anchor_loss"
NUM_STATS = len(SoftmaxStat)
NUM_PROXY_ANCHOR_STATS = len(ProxyAnchorStat)

POOLS = {"max": SoftmaxPool.MAX, "soft_avg": SoftmaxPool.SOFT_AVG}

TRANSFORMS = {
    "identity": SoftmaxTransform.IDENTITY,
    "normface": SoftmaxTransform.NORM_FACE,
    "cosface": SoftmaxTransform.COS_FACE,
    "arcface": SoftmaxTransform.ARC_FACE,
    "circle": SoftmaxTransform.CIRCLE_CLASS,
}
_KIND = {int(v): k for k, v in TRANSFORMS.items()}


def make_params(log_end, bonus_weight, label_smoothing, eps, t0=0.0, t1=0.0) -> list[float]:
    """The ops' params list, in SoftmaxParam order."""
    values = {SoftmaxParam.LOG_END: log_end, SoftmaxParam.RHO: bonus_weight, SoftmaxParam.SMOOTH: label_smoothing,
              SoftmaxParam.EPS: eps, SoftmaxParam.T0: t0, SoftmaxParam.T1: t1}
    return [float(values[p]) for p in SoftmaxParam]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake kernels


def _fake_forward(logits, target, class_weight, ignore_index, transform, params, compute_grad):
    torch._check(logits.dim() == 2, lambda: "logits must be (N, C)")
    torch._check(target.shape == (logits.shape[0],) or target.shape == logits.shape,
                 lambda: "target must be (N,) class indices or (N, C) class probabilities")
    N, C = logits.shape
    stats = logits.new_empty((N, NUM_STATS), dtype=acc_dtype(logits.dtype))
    grad = logits.new_empty((N if compute_grad else 0, C))
    return stats, grad


def _fake_backward(logits, target, class_weight, row_stats, row_weights, ignore_index, transform, params):
    torch._check(row_stats.shape == (logits.shape[0], NUM_STATS), lambda: f"row_stats must be (N, {NUM_STATS})")
    torch._check(row_weights.shape == (logits.shape[0],), lambda: "row_weights must be (N,)")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_linear_forward(input, weight, bias, target, class_weight, ignore_index, transform, params, grad_mask,
                         row_chunk, class_tile):
    torch._check(input.dim() == 2 and weight.dim() == 2, lambda: "input and weight must be 2-D")
    torch._check(input.shape[1] == weight.shape[1], lambda: "input and weight differ in H")
    stats = input.new_empty((input.shape[0], NUM_STATS), dtype=acc_dtype(input.dtype))
    return (stats,) + _fake_linear_backward(input, weight, bias, target, class_weight, stats, None, ignore_index,
                                            transform, params, grad_mask, row_chunk, class_tile)


def _fake_linear_backward(input, weight, bias, target, class_weight, row_stats, row_weights, ignore_index, transform,
                          params, grad_mask, row_chunk, class_tile):
    N, H = input.shape
    C = weight.shape[0]
    return (input.new_empty((N if grad_mask[0] else 0, H)), input.new_empty((C if grad_mask[1] else 0, H)),
            input.new_empty((C if grad_mask[2] and bias is not None else 0,)))


def _fake_pooled_forward(input, weight, target, class_weight, ignore_index, transform, params, pool, group,
                         pool_param, grad_mask):
    torch._check(input.dim() == 2 and weight.dim() == 2, lambda: "input and weight must be 2-D")
    torch._check(input.shape[1] == weight.shape[1], lambda: "input and weight differ in H")
    stats = input.new_empty((input.shape[0], NUM_STATS), dtype=acc_dtype(input.dtype))
    return (stats,) + _fake_pooled_backward(input, weight, target, class_weight, stats, None, ignore_index, transform,
                                            params, pool, group, pool_param, grad_mask)


def _fake_pooled_backward(input, weight, target, class_weight, row_stats, row_weights, ignore_index, transform, params,
                          pool, group, pool_param, grad_mask):
    N, H = input.shape
    return (input.new_empty((N if grad_mask[0] else 0, H)), input.new_empty((weight.shape[0] if grad_mask[1] else 0, H)))


def _fake_proxy_anchor(x, proxies, labels, params):
    torch._check(x.dim() == 2 and proxies.dim() == 2 and x.shape[1] == proxies.shape[1],
                 lambda: "x (N, D) and proxies (C, D)")
    return x.new_empty((proxies.shape[0], NUM_PROXY_ANCHOR_STATS))


def _fake_proxy_anchor_backward(x, proxies, labels, class_stats, class_weights, params, grad_mask):
    return (x.new_empty((x.shape[0] if grad_mask[0] else 0, x.shape[1])),
            x.new_empty((proxies.shape[0] if grad_mask[1] else 0, x.shape[1])))


# ---------------------------------------------------------------- autograd


def _tracing(t: Optional[Tensor]) -> bool:
    """True while torch.compile / AOTAutograd traces: buffers are then not consumed in place."""
    if torch.compiler.is_compiling():
        return True
    if t is None:
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or torch._is_functional_tensor(t) or type(t) is not torch.Tensor


def _row_weights(grad_stats: Tensor, row_stats: Tensor) -> Tensor:
    return grad_stats[:, SoftmaxStat.ROW_LOSS].to(row_stats.dtype).contiguous()


def _setup_context(ctx, inputs, output):
    logits, target, class_weight, ignore_index, transform, params, compute_grad = inputs
    row_stats, grad = output
    ctx.save_for_backward(logits, target, class_weight, row_stats)
    # Only the statistics are differentiable: without this, autograd would materialize a zero
    # (N, C) gradient for the grad_logits output in every backward.
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    # Detached: the buffer is an output of this node, and holding it with its grad_fn would make
    # a reference cycle (node -> ctx -> grad -> node).
    ctx.grad_buf = grad.detach() if compute_grad else None
    ctx.spec = (int(ignore_index), int(transform), [float(p) for p in params])


def reference_rows(raw: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int, transform: int,
                   params) -> Tensor:
    """The row losses of an op's inputs by the reference: the differentiable twin of the kernels."""
    p = {k: params[k] for k in SoftmaxParam}
    logits = raw
    if transform != SoftmaxTransform.IDENTITY:
        logits = _ref.margin_logits(raw, target, _KIND[transform], p[SoftmaxParam.T0], p[SoftmaxParam.T1],
                                    ignore_index)
    return _ref.row_losses(logits, target, log_end=p[SoftmaxParam.LOG_END], bonus_weight=p[SoftmaxParam.RHO],
                           weight=class_weight, ignore_index=ignore_index, label_smoothing=p[SoftmaxParam.SMOOTH],
                           eps=p[SoftmaxParam.EPS])[0]


def _exact_grads(rows_of, inputs, needs, w):
    """Gradients of sum_i w_i rows_i with respect to the needed inputs, with a graph (create_graph):
    rows_of(*inputs) recomputes the rows in plain torch ops, autocast off."""
    wanted = [t for t, n in zip(inputs, needs) if n]
    with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
        rows = rows_of(*inputs)
        grads = iter(torch.autograd.grad(rows, wanted, w.to(rows.dtype), create_graph=True, allow_unused=True))
    out = []
    for t, n in zip(inputs, needs):
        g = next(grads) if n else None
        out.append(torch.zeros_like(t) if n and g is None else g)
    return out


def _differentiable_backward(ctx, grad_stats, _g_grad):
    logits, target, class_weight, row_stats = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    if grad_stats is None or not any(needs):
        return (None,) * 7
    ignore_index, transform, params = ctx.spec
    acc = row_stats.dtype

    def rows_of(z, t):
        return reference_rows(z.to(acc), t, class_weight, ignore_index, transform, params)

    g_logits, g_target = _exact_grads(rows_of, (logits, target), needs, grad_stats[:, SoftmaxStat.ROW_LOSS])
    return (g_logits, g_target) + (None,) * 5


def _target_grad(logits, target, class_weight, row_stats, w, params) -> Tensor:
    """d(sum_i w_i l_i)/d t of class-probability targets: w_i (1 - ls) w_j f_j, f from the saved LSE."""
    acc = row_stats.dtype
    logp = logits.to(acc) - row_stats[:, SoftmaxStat.LSE, None]
    f = -logp + params[SoftmaxParam.RHO] * _ref.bonus(logp.exp(), -torch.expm1(logp), params[SoftmaxParam.LOG_END],
                                                      params[SoftmaxParam.EPS])
    if class_weight is not None:
        f = f * class_weight.to(acc)
    return (w.unsqueeze(1) * (1.0 - params[SoftmaxParam.SMOOTH]) * f).to(target.dtype)


def _backward(ctx, backward_op, grad_stats, _g_grad):
    logits, target, class_weight, row_stats = ctx.saved_tensors
    want_logits, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_stats is None or not (want_logits or want_target):
        return (None,) * 7
    ignore_index, transform, params = ctx.spec
    w = _row_weights(grad_stats, row_stats)
    g_target = _target_grad(logits, target, class_weight, row_stats, w, params) if want_target else None
    buf = ctx.grad_buf
    if not want_logits:
        g = None
    elif buf is not None:
        # buf holds each row's own gradient: the same products as the recomputing kernel, in
        # place the first time (the buffer is handed out once), out of place under tracing.
        if _tracing(buf):
            g = buf * w.unsqueeze(1)
        else:
            ctx.grad_buf = None
            g = buf.mul_(w.unsqueeze(1))
    else:
        g = backward_op(logits, target, class_weight, row_stats, w, ignore_index, transform, params)
    return (g, g_target) + (None,) * 5


def _setup_linear_context(ctx, inputs, output):
    (input, weight, bias, target, class_weight, ignore_index, transform, params, grad_mask, row_chunk,
     class_tile) = inputs
    row_stats, gx, gw, gb = output
    ctx.save_for_backward(input, weight, bias, target, class_weight, row_stats)
    ctx.mark_non_differentiable(gx, gw, gb)
    ctx.set_materialize_grads(False)
    ctx.grads = (gx.detach(), gw.detach(), gb.detach()) if any(grad_mask) else None
    ctx.spec = (int(ignore_index), int(transform), [float(p) for p in params], list(grad_mask), int(row_chunk),
                int(class_tile))


def _linear_backward(ctx, backward_op, grad_stats, _g_gx, _g_gw, _g_gb):
    input, weight, bias, target, class_weight, row_stats = ctx.saved_tensors
    ignore_index, transform, params, grad_mask, row_chunk, class_tile = ctx.spec
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if grad_stats is None or not any(need):
        return (None,) * 11
    w = _row_weights(grad_stats, row_stats)
    out = _forward_grads_or(ctx.grads, grad_mask, need, w, lambda: backward_op(
        input, weight, bias, target, class_weight, row_stats, w, ignore_index, transform, params, need, row_chunk,
        class_tile))
    return out[0], out[1], out[2], None, None, None, None, None, None, None, None


def _linear_differentiable_backward(ctx, grad_stats, _g_gx, _g_gw, _g_gb):
    input, weight, bias, target, class_weight, row_stats = ctx.saved_tensors
    ignore_index, transform, params = ctx.spec[:3]
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    if grad_stats is None or not any(needs):
        return (None,) * 11
    acc = row_stats.dtype

    def rows_of(x, W, b):
        logits = F.linear(x.to(acc), W.to(acc), None if b is None else b.to(acc))
        return reference_rows(logits, target, class_weight, ignore_index, transform, params)

    gx, gw, gb = _exact_grads(rows_of, (input, weight, bias), needs, grad_stats[:, SoftmaxStat.ROW_LOSS])
    return (gx, gw, gb) + (None,) * 8


def _linear_autocast(args, autocast_dtype):
    """Under autocast: the products in the autocast dtype (F.linear's rule), the loss in float32
    (F.cross_entropy's): input, weight and bias in autocast_dtype, class weights in float32."""
    input, weight, bias, target, class_weight = args[:5]
    products = _oplib.cast_floats((input, weight, bias), autocast_dtype)
    return (*products, target, _oplib.cast_floats(class_weight, torch.float32, low_only=True)) + tuple(args[5:])


# Public name of the loss each transform serves (for the error messages).
_NAMES = {int(SoftmaxTransform.IDENTITY): "encouraging_loss", int(SoftmaxTransform.NORM_FACE): "normface_loss",
          int(SoftmaxTransform.COS_FACE): "cosface_loss", int(SoftmaxTransform.ARC_FACE): "arcface_loss",
          int(SoftmaxTransform.CIRCLE_CLASS): "circle_class_loss"}


def _forward_grads_or(grads, grad_mask, need, w, recompute):
    """The gradients of the fused linear ops: the forward's (of the unit-weight sum) scaled, when
    it wrote every one needed and no second derivative is asked for, else recompute()'s. The
    input's gradient is scaled row by row, the others' (summed over rows) by row 0's weight:
    only reductions weighting every row alike (mean, sum) ask the forward for them."""
    if grads is not None and all(m or not n for m, n in zip(grad_mask, need)) and not _oplib.create_graph():
        w0 = w[:1].sum()
        scales = (w.unsqueeze(1),) + (w0,) * (len(grads) - 1)
        # Scaled out of place (retain_graph, reentrancy).
        return [g * c.to(g.dtype) if n else None for g, c, n in zip(grads, scales, need)]
    return [g if n else None for g, n in zip(recompute(), need)]


def _setup_pooled_context(ctx, inputs, output):
    (input, weight, target, class_weight, ignore_index, transform, params, pool, group, pool_param, grad_mask) = inputs
    row_stats, gx, gw = output
    ctx.save_for_backward(input, weight, target, class_weight, row_stats)
    ctx.mark_non_differentiable(gx, gw)
    ctx.set_materialize_grads(False)
    ctx.grads = (gx.detach(), gw.detach()) if any(grad_mask) else None
    ctx.spec = (int(ignore_index), int(transform), [float(p) for p in params], int(pool), int(group), float(pool_param),
                list(grad_mask))


def _pooled_backward(ctx, backward_op, grad_stats, _g_gx, _g_gw):
    input, weight, target, class_weight, row_stats = ctx.saved_tensors
    ignore_index, transform, params, pool, group, pool_param, grad_mask = ctx.spec
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if grad_stats is None or not any(need):
        return (None,) * 11
    w = _row_weights(grad_stats, row_stats)
    out = _forward_grads_or(ctx.grads, grad_mask, need, w, lambda: backward_op(
        input, weight, target, class_weight, row_stats, w, ignore_index, transform, params, pool, group, pool_param,
        need))
    return (out[0], out[1]) + (None,) * 9


def _setup_proxy_anchor_context(ctx, inputs, output):
    x, proxies, labels, params = inputs
    ctx.save_for_backward(x, proxies, labels, output)
    ctx.params = [float(p) for p in params]


def _proxy_anchor_backward(ctx, backward_op, grad_stats):
    x, proxies, labels, stats = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if grad_stats is None or not any(need):
        return None, None, None, None
    weights = grad_stats[:, [ProxyAnchorStat.POS_TERM, ProxyAnchorStat.NEG_TERM]].to(stats.dtype).contiguous()
    gx, gp = backward_op(x, proxies, labels, stats, weights, ctx.params, need)
    return (gx if need[0] else None), (gp if need[1] else None), None, None


SOFTMAX_OP = _oplib.LossOp(
    OP, fake=_fake_forward, backward_fake=_fake_backward, setup_context=_setup_context, backward=_backward,
    differentiable_backward=_differentiable_backward, autocast=_oplib.to_float32,
    what=lambda *inputs: _NAMES[inputs[6]], triton=("structloss_fast.softmax._triton", "forward", "backward"),
)
LINEAR_SOFTMAX_OP = _oplib.LossOp(
    LINEAR_OP, fake=_fake_linear_forward, backward_fake=_fake_linear_backward, setup_context=_setup_linear_context,
    backward=_linear_backward, differentiable_backward=_linear_differentiable_backward, autocast=_linear_autocast,
    what=lambda *inputs: "linear_" + _NAMES[inputs[8]] if inputs[8] == SoftmaxTransform.IDENTITY else _NAMES[inputs[8]],
    triton=("structloss_fast.softmax._triton", "linear_forward", "linear_backward"),
)

POOLED_SOFTMAX_OP = _oplib.LossOp(
    POOLED_OP, fake=_fake_pooled_forward, backward_fake=_fake_pooled_backward, setup_context=_setup_pooled_context,
    backward=_pooled_backward, what="subcenter_arcface_loss / soft_triple_loss (the pooled fused linear op)",
)
PROXY_ANCHOR_LOSS_OP = _oplib.LossOp(
    PROXY_ANCHOR_OP, fake=_fake_proxy_anchor, backward_fake=_fake_proxy_anchor_backward,
    setup_context=_setup_proxy_anchor_context, backward=_proxy_anchor_backward, what="proxy_anchor_loss",
)

for _op in (OP, LINEAR_OP):
    _registry.declare(_registry.OpSpec(_op, family="softmax", kernels=("cpu", "triton")))
# CPU kernels only: on CUDA tensors "auto" runs the reference (dense N x C).
for _op in (POOLED_OP, PROXY_ANCHOR_OP):
    _registry.declare(_registry.OpSpec(_op, family="softmax", kernels=("cpu",)))


# ---------------------------------------------------------------- the one reduction


def mean_denominator(target: Tensor, class_weight: Optional[Tensor], ignore_index: int, C: int, dtype) -> Tensor:
    """Sum of the target class weights of the non-ignored rows (1 when that is 0), on device;
    the number of rows for class-probability targets (F.cross_entropy's)."""
    if target.is_floating_point():
        return torch.full((), target.shape[0], dtype=dtype, device=target.device).clamp_min(1)
    valid = target != ignore_index
    if class_weight is None:
        denom = valid.sum().to(dtype)
    else:
        safe = torch.where(valid, target, torch.zeros_like(target)).clamp(0, max(C - 1, 0))
        denom = (class_weight.detach().to(dtype)[safe] * valid.to(dtype)).sum()
    return torch.where(denom == 0, torch.ones_like(denom), denom)


def reduce(row_stats: Tensor, target: Tensor, class_weight: Optional[Tensor], ignore_index: int, num_classes: int,
           reduction: str) -> Tensor:
    """The loss from the row statistics, for every backend, as F.cross_entropy reduces: the row
    losses ("none"), their sum, or their sum over the summed class weights of the non-ignored
    targets ("mean"; 0 when every target is ignored; over the rows for probability targets)."""
    rows = row_stats[:, SoftmaxStat.ROW_LOSS]
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "mean":
        total = total / mean_denominator(target, class_weight, ignore_index, num_classes, rows.dtype)
    return total


def run(backend: str, logits, target, class_weight, ignore_index: int, transform: int, params,
        compute_grad: bool) -> Tensor:
    """The row statistics (N, NUM_STATS) of a resolved backend."""
    return SOFTMAX_OP.op(backend)(logits, target, class_weight, int(ignore_index), int(transform),
                                  [float(p) for p in params], bool(compute_grad))[0]


def run_linear(backend: str, input, weight, bias, target, class_weight, ignore_index: int, transform: int, params,
               grad_mask, row_chunk: int = 0, class_tile: int = 0) -> Tensor:
    """The row statistics of the fused linear op. Any grad_mask bit only for reductions that
    weight every row alike (see _linear_backward)."""
    return LINEAR_SOFTMAX_OP.op(backend)(input, weight, bias, target, class_weight, int(ignore_index), int(transform),
                                         [float(p) for p in params], [bool(m) for m in grad_mask], int(row_chunk),
                                         int(class_tile))[0]


def run_pooled(backend: str, input, weight, target, class_weight, ignore_index: int, transform: int, params, pool: int,
               group: int, pool_param: float, grad_mask) -> Tensor:
    """The row statistics of the pooled fused linear op (grad_mask bits only for reductions that
    weight every row alike)."""
    return POOLED_SOFTMAX_OP.op(backend)(input, weight, target, class_weight, int(ignore_index), int(transform),
                                         [float(p) for p in params], int(pool), int(group), float(pool_param),
                                         [bool(m) for m in grad_mask])[0]


def run_proxy_anchor(backend: str, x, proxies, labels, alpha: float, margin: float) -> Tensor:
    """Per-class statistics (C, NUM_PROXY_ANCHOR_STATS) of normalized x and proxies."""
    return PROXY_ANCHOR_LOSS_OP.op(backend)(x, proxies, labels, [float(alpha), float(margin)])
