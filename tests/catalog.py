"""Every public loss as a test case: how to build small inputs for it, how to call it on a
backend with a reduction, and what its higher-order gradients are. The cross-cutting tests
(test_higher_order, test_compile, test_autocast, test_sweep) run over this one list, so a new
public loss is added here once and is then checked by all of them."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch

import structloss_fast as slf
from tests.helpers import can_run, triton_device


@dataclasses.dataclass
class Case:
    name: str
    # build(B, dtype, gen) -> (differentiable inputs, constants): B rows of float `dtype` inputs.
    build: Callable
    # call(backend, reduction, *inputs, **constants) -> the loss
    call: Callable
    op: Optional[str] = None            # the custom op behind the fast backends (None: torch ops only)
    backends: tuple = ("cpu", "triton")
    reductions: tuple = ("mean", "sum", "none")
    # "exact": create_graph gives the reference's second derivative on every backend;
    # "raises": the fast backends raise an error naming `name` (the reference is exact).
    second_order: str = "exact"
    smooth: bool = True                 # gradgradcheck applies (no detached terms, no kinks at random points)

    def __repr__(self):
        return self.name

    def available(self) -> list[tuple[str, torch.device]]:
        """(backend, device) pairs this machine runs: the reference, then the fast backends."""
        out = [("reference", torch.device("cpu"))]
        if self.op is None:
            return out
        for b in self.backends:
            device = triton_device() if b == "triton" else torch.device(b)
            if can_run(b, self.op, device):
                out.append((b, device))
        return out


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _labels(gen, B, classes):
    return torch.randint(0, classes, (B,), generator=gen)


# ---------------------------------------------------------------- pairwise

_PAIRWISE = [
    ("circle_loss", dict(m=0.4, gamma=8.0), False),
    ("unified_loss", dict(m=0.35, gamma=8.0), True),
    ("multi_similarity_loss", dict(alpha=2.0, beta=5.0, base=0.5), True),
    ("supcon_loss", dict(temperature=0.5), True),
    ("ntxent_loss", dict(temperature=0.5), True),
    ("contrastive_loss", dict(pos_margin=0.1, neg_margin=1.2), False),
    ("triplet_margin_loss", dict(margin=0.3, mining="all"), False),
    ("triplet_margin_loss", dict(margin=0.3, mining="batch_hard"), False),
]


def _pairwise_case(name, params, smooth):
    fn = getattr(slf, name)

    def build(B, dtype, gen):
        return [_randn(gen, B, 5, dtype=dtype)], dict(labels=_labels(gen, B, max(B // 3, 2)))

    def call(backend, reduction, x, labels):
        return fn(x, labels, backend=backend, reduction=reduction, **params)

    backends = ("cpu", "triton") if params.get("mining") != "all" else ("cpu",)
    label = name + ("[batch_hard]" if params.get("mining") == "batch_hard" else "")
    return Case(label, build, call, op="pairwise_loss", backends=backends, second_order="raises", smooth=smooth)


# The losses ported from pytorch-metric-learning on the pair engine (CPU kernels; MarginLoss on
# the per-anchor-parameter op; N-pairs on the fused linear softmax op).
_PORTED = [
    ("generalized_lifted_structure_loss", dict(neg_margin=1.0, pos_margin=0.1), "pairwise_loss", True),
    ("tuplet_margin_loss", dict(margin=0.1, scale=8.0), "pairwise_loss", True),
    ("fastap_loss", dict(num_bins=6), "pairwise_loss", False),
    ("margin_based_loss", dict(margin=0.2, beta=1.1), "pairwise_loss_rowparam", False),
]


def _ported_case(name, params, op, smooth):
    fn = getattr(slf, name)

    def build(B, dtype, gen):
        return [_randn(gen, B, 5, dtype=dtype)], dict(labels=_labels(gen, B, max(B // 3, 2)))

    def call(backend, reduction, x, labels):
        return fn(x, labels, backend=backend, reduction=reduction, **params)

    return Case(name, build, call, op=op, backends=("cpu",), second_order="raises", smooth=smooth)


def _npairs():
    def build(B, dtype, gen):
        return [_randn(gen, B, 5, dtype=dtype)], dict(labels=_labels(gen, B, max(B // 2, 1)))

    def call(backend, reduction, x, labels):
        return slf.npairs_loss(x, labels, reduction=reduction, backend=backend)

    return Case("npairs_loss", build, call, op="linear_softmax_loss")


# ---------------------------------------------------------------- softmax

def _encouraging(probs: bool):
    def build(B, dtype, gen):
        logits = _randn(gen, B, 6, dtype=dtype) * 2
        if probs:
            target = torch.softmax(_randn(gen, B, 6, dtype=torch.float64), 1).to(dtype)
            return [logits, target], dict(weight=None)
        return [logits], dict(target=_labels(gen, B, 6), weight=torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)

    def call(backend, reduction, logits, target, weight):
        w = None if weight is None else weight.to(logits.dtype)
        return slf.encouraging_loss(logits, target, weight=w, label_smoothing=0.1, bonus_weight=0.7,
                                    reduction=reduction, backend=backend)

    return Case("encouraging_loss" + ("[probs]" if probs else ""), build, call, op="softmax_loss")


def _linear():
    def build(B, dtype, gen):
        return ([_randn(gen, B, 5, dtype=dtype), _randn(gen, 7, 5, dtype=dtype), _randn(gen, 7, dtype=dtype)],
                dict(target=_labels(gen, B, 7)))

    def call(backend, reduction, x, W, b, target):
        return slf.linear_encouraging_loss(x, W, target, b, label_smoothing=0.1, reduction=reduction, backend=backend)

    return Case("linear_encouraging_loss", build, call, op="linear_softmax_loss")


def _head(name, params, fused, smooth=True):
    fn = getattr(slf, name)

    def build(B, dtype, gen):
        return [_randn(gen, B, 5, dtype=dtype), _randn(gen, 7, 5, dtype=dtype)], dict(labels=_labels(gen, B, 7))

    def call(backend, reduction, x, W, labels):
        return fn(x, W, labels, fused=fused, bonus_weight=0.5, reduction=reduction, backend=backend, **params)

    return Case(f"{name}[{'fused' if fused else 'dense'}]", build, call,
                op="linear_softmax_loss" if fused else "softmax_loss", smooth=smooth)


_HEADS = [("normface_loss", dict(scale=4.0), True), ("cosface_loss", dict(margin=0.2, scale=4.0), True),
          ("arcface_loss", dict(margin=0.3, scale=4.0), True), ("circle_class_loss", dict(m=0.25, gamma=8.0), False)]


def _proxy(name, params, classes, rows, fused, op, **kw):
    """PML's proxy losses: `rows` proxy rows per class."""
    fn = getattr(slf, name)

    def build(B, dtype, gen):
        return ([_randn(gen, B, 5, dtype=dtype), _randn(gen, classes * rows, 5, dtype=dtype)],
                dict(labels=_labels(gen, B, classes)))

    def call(backend, reduction, x, W, labels):
        extra = {} if fused is None else dict(fused=fused)
        return fn(x, W, labels, reduction=reduction, backend=backend, **extra, **params)

    label = name if fused is None else f"{name}[{'fused' if fused else 'dense'}]"
    return Case(label, build, call, op=op, **kw)


_PROXIES = [
    ("normalized_softmax_loss", dict(temperature=0.5), 7, 1, True, "linear_softmax_loss", {}),
    ("normalized_softmax_loss", dict(temperature=0.5), 7, 1, False, "softmax_loss", {}),
    ("proxy_nca_loss", dict(softmax_scale=2.0), 7, 1, True, "linear_softmax_loss", {}),
    ("subcenter_arcface_loss", dict(sub_centers=2, scale=4.0), 7, 2, True, "pooled_linear_softmax_loss",
     dict(backends=("cpu",), smooth=False, second_order="raises")),
    ("subcenter_arcface_loss", dict(sub_centers=2, scale=4.0), 7, 2, False, "softmax_loss", dict(smooth=False)),
    ("soft_triple_loss", dict(centers_per_class=2, la=4.0, gamma=0.5), 4, 2, True, "pooled_linear_softmax_loss",
     dict(backends=("cpu",), second_order="raises")),
    ("soft_triple_loss", dict(centers_per_class=2, la=4.0, gamma=0.5), 4, 2, False, "softmax_loss", {}),
    ("proxy_anchor_loss", dict(margin=0.1, alpha=4.0), 7, 1, None, "proxy_anchor_loss",
     dict(backends=("cpu",), smooth=False, second_order="raises")),
]


# ---------------------------------------------------------------- the others

def _jem():
    def build(B, dtype, gen):
        return [_randn(gen, B, 4, dtype=dtype), _randn(gen, B, 4, dtype=dtype)], dict(labels=_labels(gen, B, 4))

    def call(backend, reduction, data, samples, labels):
        return slf.jem_loss(data, samples, labels, energy_l2=0.1)

    return Case("jem_loss", build, call, backends=(), reductions=("mean",))


def _mahalanobis(kind):
    def build(B, dtype, gen):
        factor = {"per_sample": (B, 3, 2), "shared": (3, 2), "diagonal": (B, 3)}[kind]
        return [_randn(gen, B, 3, dtype=dtype), _randn(gen, B, 3, dtype=dtype), _randn(gen, *factor, dtype=dtype)], {}

    def call(backend, reduction, pred, target, factor):
        return slf.mahalanobis_loss(pred, target, factor, eps=0.1, diagonal=kind == "diagonal", reduction=reduction)

    return Case(f"mahalanobis_loss[{kind}]", build, call, backends=())


def _imitation():
    def build(B, dtype, gen):
        return ([_randn(gen, B, 4, dtype=dtype), _randn(gen, B, 2, 3, dtype=dtype)],
                dict(teacher=[_randn(gen, B, 4, dtype=dtype), _randn(gen, B, 2, 3, dtype=dtype)]))

    def call(backend, reduction, a, b, teacher):
        return slf.layer_imitation_loss([a, b], [t.to(a.dtype) for t in teacher], weights=[1.0, 0.5],
                                        reduction=reduction, backend=backend)

    return Case("layer_imitation_loss", build, call, op="layer_imitation_loss", backends=("cpu",),
                reductions=("mean", "sum", "batchmean"))


def _seal():
    L, H, K = 5, 4, 3

    def build(B, dtype, gen):
        probs = torch.rand(B, L, generator=gen, dtype=torch.float64).to(dtype)
        samples = (torch.rand(B, K, L, generator=gen) < 0.5).to(dtype)
        labels = (torch.rand(B, L, generator=gen) < 0.3).to(dtype)
        return ([_randn(gen, B, L, dtype=dtype), _randn(gen, H, L, dtype=dtype), _randn(gen, H, dtype=dtype),
                 _randn(gen, H, dtype=dtype)], dict(probs=probs, labels=labels, samples=samples))

    def call(backend, reduction, unary, W, b, c, probs, labels, samples):
        return slf.sampled_nce_loss(unary, probs.to(unary.dtype), labels.to(unary.dtype), W, b, c,
                                    samples=samples.to(unary.dtype), reduction=reduction, backend=backend)

    return Case("sampled_nce_loss", build, call, op="seal_nce_loss", second_order="raises")


def _energy_nets():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        net = slf.EnergyNet(6, 5, hidden=8, global_hidden=6, dropout=0.0).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return {dt: copy.deepcopy(net).to(dt) for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


# A small fixed EnergyNet per dtype (parameters frozen: the cases differentiate in x), built
# once here rather than inside a compiled region.
_ENERGY = _energy_nets()


def energy_net(dtype):
    return _ENERGY[dtype]


def _seal_energy(kind):
    L = 5

    def build(B, dtype, gen):
        x = _randn(gen, B, 6, dtype=dtype)
        probs = torch.rand(B, L, generator=gen, dtype=torch.float64).to(dtype)
        labels = (torch.rand(B, L, generator=gen) < 0.3).to(dtype)
        samples = (torch.rand(B, 3, L, generator=gen) < 0.5).to(dtype)
        return [x], dict(probs=probs, labels=labels, samples=samples)

    def call(backend, reduction, x, probs, labels, samples):
        net = energy_net(x.dtype)
        probs, labels, samples = probs.to(x.dtype), labels.to(x.dtype), samples.to(x.dtype)
        if kind == "nce_ranking_loss":
            return slf.nce_ranking_loss(net, x, probs, labels, samples=samples, reduction=reduction, backend=backend)
        if kind == "regression_loss":
            return slf.regression_loss(net, x, probs, labels, reduction=reduction)
        if kind == "margin_loss":
            return slf.margin_loss(net, x, labels, probs, lambda_p=0.5, prediction=samples[:, 0], reduction=reduction)
        return slf.seal_task_loss(net, x, probs * 4 - 2, labels, weight=0.5, reduction=reduction)

    fused = kind == "nce_ranking_loss"
    return Case(kind, build, call, op="seal_nce_loss" if fused else None, backends=("cpu", "triton") if fused else (),
                second_order="raises" if fused else "exact", smooth=kind != "margin_loss",
                reductions=("mean", "sum", "none"))


def _adversarial(kind):
    def build(B, dtype, gen):
        return [_randn(gen, B, 4, dtype=dtype)], dict(y=_labels(gen, B, 3))

    def call(backend, reduction, x, y):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(x.dtype)
        fn = slf.pgd_adversarial_loss if kind == "pgd" else slf.trades_loss
        extra = dict(clean_weight=0.3) if kind == "pgd" else {}
        return fn(model, x, y, eps=0.1, n_iter=2, random_start=False, clamp=None, reduction=reduction, **extra)

    # The attack's result is a constant of the loss (Danskin): its derivative in x is not the
    # loss's total derivative, so gradgradcheck in x does not apply; test_higher_order checks
    # these with a zero-step attack in the model's parameters.
    return Case({"pgd": "pgd_adversarial_loss", "trades": "trades_loss"}[kind], build, call, backends=(),
                smooth=False)


CASES: list[Case] = (
    [_pairwise_case(*c) for c in _PAIRWISE]
    + [_ported_case(*c) for c in _PORTED] + [_npairs()]
    + [_encouraging(False), _encouraging(True), _linear()]
    + [_head(n, p, fused, smooth) for n, p, smooth in _HEADS for fused in (True, False)]
    + [_proxy(n, p, c, r, f, op, **kw) for n, p, c, r, f, op, kw in _PROXIES]
    + [_jem(), _mahalanobis("per_sample"), _mahalanobis("shared"), _mahalanobis("diagonal"), _imitation(), _seal()]
    + [_seal_energy(k) for k in ("nce_ranking_loss", "regression_loss", "margin_loss", "seal_task_loss")]
    + [_adversarial("pgd"), _adversarial("trades")]
)
CASE_IDS = [c.name for c in CASES]


def public_losses() -> set[str]:
    """The names of the public loss functions (the catalogue must cover each one)."""
    return {n for n in slf.__all__ if n.endswith("_loss")}
