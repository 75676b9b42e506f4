"""SEAL: structured energy networks as losses for multi-label classification (docs/spec/seal.md),
and SPEN's gradient-based inference as the baseline predictor.

Sign convention: `EnergyNet` computes a *score* s(x, y) = -E(x, y), higher is better (as the
authors' code does); `EnergyNet.energy` returns E = -s.

    s(x, y) = sum_i y_i b_i^T T(x)  +  c2^T softplus(C1 y + b1)  [+ d2^T softplus(D1 [y; T(x)] + d1)]
              local (unary u = T(x) B^T)   global                   conditional (SPEN, optional)

Losses of the loss-net (the energy) and of the task-net:
- `nce_ranking_loss`: K samples from Bernoulli(p) per example, gold at index 0,
  z_k = s(x, y_k) - log q(y_k), loss = -z_0 + LSE_k z_k (summed over the batch by default);
  `use_logq=False` is the "ranking" variant. The samples are drawn and scored by a fused kernel
  that never stores the B x K x L sample tensor (`sampled_nce_loss` is its functional form).
- `regression_loss`: BCEWithLogits(s(x, p), soft-F1(p, y*)) (DVN-style).
- `margin_loss`: relu(Delta(y_ca, y*) - s(y*) + s(y_ca)) + lambda_p relu(s(y^) - s(y*)).
- `seal_task_loss`: w * (-s(x, sigmoid(F(x)))) + sum_l BCEWithLogits(F(x)_l, y_l) (batch mean).
- `gbi_inference`: SPEN's gradient-based inference (entropic mirror descent on s).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _oplib, _registry, _validate
from . import _ops
from . import reference as _ref

__all__ = [
    "EnergyNet", "CostAugmentedNet", "sampled_nce_loss", "nce_ranking_loss", "regression_loss", "margin_loss",
    "seal_task_loss", "gbi_inference", "soft_f1", "manhattan_delta", "seal_bernoulli", "NCERankingLoss",
]

soft_f1 = _ref.soft_f1
manhattan_delta = _ref.manhattan_delta


# ---------------------------------------------------------------- validation helpers


def _check_values(name: str, t: Tensor, *, binary: bool = False) -> None:
    """Values in [0, 1] (or in {0, 1}); NaN passes (it must give a NaN loss, not an error).
    On CPU this reads the values (one min/max reduction in the common case); on a GPU, and
    under torch.compile, it is an asynchronous device-side assert."""
    if t.numel() == 0:
        return
    what = "hold only 0 and 1" if binary else "lie in [0, 1]"
    on_host = t.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and not binary:
        lo, hi = torch.aminmax(t.detach())  # NaN when any value is NaN: then the full check
        if bool((lo >= 0) & (hi <= 1)):
            return
    bad = ((t != 0) & (t != 1) & ~torch.isnan(t)) if binary else ((t < 0) | (t > 1))
    if not on_host:
        torch._assert_async(~bad.any(), f"structloss_fast: {name} must {what}")
    elif bool(bad.any()):
        bad_vals = t[bad]
        raise ValueError(f"{name} must {what}, got values such as {bad_vals[0].item():g} "
                         f"({int(bad.sum())} of {t.numel()} outside)")


def _same_shape(name: str, t: Tensor, shape, other: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {other} {tuple(shape)}, got {tuple(t.shape)}")


def _reduction(value: str) -> str:
    return _validate.reduction(value)


def _draw_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """One int64 from torch's generator: the given one, else the default generator of the
    tensors' device (torch.manual_seed reproduces the kernels' samples). Drawn where it is used,
    so that a CUDA call neither copies from the host nor waits for it (and can be captured in
    a CUDA graph); a generator of another device costs one copy."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=generator, device=gen_device)
    return seed.to(device, non_blocking=True)


def _compute_dtype(*tensors: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the result: the promoted one, float32 under autocast; dtype the kernels compute
    in: float32 for low precision)."""
    dt = _oplib.loss_dtype(*tensors)
    return dt, (torch.float64 if dt == torch.float64 else torch.float32)


# ---------------------------------------------------------------- the fused noise-contrastive loss


def sampled_nce_loss(
    unary: Tensor,
    probs: Tensor,
    labels: Tensor,
    global_weight: Tensor,
    global_bias: Tensor,
    global_out: Tensor,
    *,
    num_samples: Optional[int] = None,
    samples: Optional[Tensor] = None,
    use_logq: bool = True,
    reduction: str = "sum",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tensor:
    """Noise-contrastive ranking loss of the energy s(y) = u . y + c2^T softplus(C1 y + b1).

    For each example b, K label vectors y_1..y_K ~ Bernoulli(probs_b) are drawn (inside the
    kernel, from one seed taken from torch's generator, so torch.manual_seed reproduces them),
    y_0 = labels_b, z_k = s(y_k) - log q(y_k) with log q(y) = -sum_l BCE(p_l, y_l) (logs
    clamped at -100 as torch's BCELoss), and loss_b = -z_0 + LSE_{k=0..K} z_k. Samples equal to
    the gold vector are kept. The B x K x L sample tensor is never stored: the gradient is
    formed in the same pass (reduction "sum"/"mean") or recomputed from the seed.

    Args:
        unary: (B, L) unary potentials u = T(x) B^T (float16/bfloat16/float32/float64).
        probs: (B, L) Bernoulli parameters in [0, 1] (the task-net's sigmoid outputs); a
            constant: no gradient flows into it.
        labels: (B, L) gold labels in [0, 1] (binary in the paper's setting).
        global_weight: (H, L) C1; global_bias: (H,) b1; global_out: (H,) c2.
        num_samples: K >= 1 (default 20); with `samples`, K is samples.shape[1].
        samples: optional (B, K, L) 0/1 samples to use instead of drawing (e.g. to compare
            backends and the reference on fixed samples).
        use_logq: False gives the "ranking" variant (z_k = s(y_k)).
        reduction: "sum" (the paper's) | "mean" | "none" (per example, (B,)).
        generator: torch.Generator the seed is drawn from (default: the default generator of the
            tensors' device; a generator of another device costs one copy).
        backend: "auto" | "reference" | "cpu" | "triton" ("cuda" has no SEAL kernel).
    """
    return _sampled_nce_loss(unary, probs, labels, global_weight, global_bias, global_out, num_samples, samples,
                             use_logq, reduction, generator, backend, check_values=True)


def _sampled_nce_loss(unary, probs, labels, global_weight, global_bias, global_out, num_samples, samples, use_logq,
                      reduction, generator, backend, check_values):
    _validate.tensor("unary", unary, ndim=2, floating=True)
    _validate.tensor("probs", probs, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=2, floating=True)
    _validate.tensor("global_weight", global_weight, ndim=2, floating=True)
    _validate.tensor("global_bias", global_bias, ndim=1, floating=True)
    _validate.tensor("global_out", global_out, ndim=1, floating=True)
    B, L = unary.shape
    _same_shape("probs", probs, unary.shape, "unary")
    _same_shape("labels", labels, unary.shape, "unary")
    if global_weight.shape[1] != L:
        raise ValueError(f"global_weight must be (H, L) with L = {L} labels (unary's), got {tuple(global_weight.shape)}")
    H = global_weight.shape[0]
    _same_shape("global_bias", global_bias, (H,), "global_weight's rows")
    _same_shape("global_out", global_out, (H,), "global_weight's rows")
    if samples is not None:
        _validate.tensor("samples", samples, ndim=3)
        if samples.dtype.is_complex or not (samples.dtype.is_floating_point or samples.dtype == torch.bool):
            raise TypeError(f"samples must be a float or bool tensor of 0/1 values, got dtype {samples.dtype}")
        if samples.shape[0] != B or samples.shape[2] != L:
            raise ValueError(f"samples must be (B, K, L) = ({B}, K, {L}), got {tuple(samples.shape)}")
        if num_samples is not None and num_samples != samples.shape[1]:
            raise ValueError(f"num_samples ({num_samples}) differs from samples.shape[1] ({samples.shape[1]})")
        num_samples = samples.shape[1]
        if num_samples < 1:
            raise ValueError(f"samples must hold K >= 1 samples per example, got shape {tuple(samples.shape)}")
    else:
        if num_samples is None:
            num_samples = 20
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples (K) must be >= 1, got {num_samples}")
    if not isinstance(use_logq, bool):
        raise TypeError(f"use_logq must be a bool, got {type(use_logq).__name__}")
    _reduction(reduction)
    _validate.same_device(unary=unary, probs=probs, labels=labels, global_weight=global_weight,
                          global_bias=global_bias, global_out=global_out, samples=samples)
    if check_values:  # (nce_ranking_loss has checked probs and labels already)
        _check_values("probs", probs)
        _check_values("labels", labels)
    if samples is not None:
        _check_values("samples", samples if samples.dtype != torch.bool else samples.to(torch.uint8), binary=True)

    chosen = _ops.resolve(backend, unary, num_samples)
    out_dtype, dt = _compute_dtype(unary, global_weight, global_bias, global_out)
    seed = _draw_seed(generator, unary.device) if samples is None else torch.zeros(1, dtype=torch.int64,
                                                                                     device=unary.device)
    if chosen == "reference":
        p = probs.detach().to(out_dtype)
        y = samples.to(out_dtype) if samples is not None else _ref.philox_bernoulli(p, num_samples, seed)
        with _oplib.autocast_off(unary.device):
            return _ref.nce_ranking_loss(unary.to(out_dtype), p, labels.to(out_dtype), y, global_weight.to(out_dtype),
                                         global_bias.to(out_dtype), global_out.to(out_dtype), use_logq=use_logq,
                                         reduction=reduction)
    args = [t.to(dt) for t in (unary, probs.detach(), labels, global_weight, global_bias, global_out)]
    samp = None if samples is None else samples.to(dt)
    compute_grad = (
        reduction != "none" and torch.is_grad_enabled()
        and any(t.requires_grad for t in (unary, global_weight, global_bias, global_out))
    )
    stats = _ops.run(chosen, *args, seed, samp, num_samples, use_logq, compute_grad)
    return _ops.reduce(stats, num_samples, reduction).to(out_dtype)


def seal_bernoulli(probs: Tensor, num_samples: int, *, generator: Optional[torch.Generator] = None,
                   seed: Optional[int] = None) -> Tensor:
    """The samples the fused kernel draws, (B, K, L) in probs' dtype: with the same generator
    state (or the same explicit 64-bit seed), `sampled_nce_loss` scores exactly these."""
    _validate.tensor("probs", probs, ndim=2, floating=True)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    _check_values("probs", probs)
    if seed is None:
        seed_t = _draw_seed(generator, probs.device)
    else:  # a fill on the device, not a copy from the host
        seed_t = torch.full((1,), int(seed) - (1 << 64) if int(seed) >= (1 << 63) else int(seed), dtype=torch.int64,
                            device=probs.device)
    chosen = _registry.resolve("seal_bernoulli", "auto", probs.device)
    if chosen == "cpu":
        dt = torch.float64 if probs.dtype == torch.float64 else torch.float32
        return torch.ops.structloss_fast.seal_bernoulli(probs.detach().to(dt), seed_t, num_samples).to(probs.dtype)
    if chosen == "triton":
        from . import _triton

        return _triton.bernoulli(probs.detach(), seed_t, num_samples)
    return _ref.philox_bernoulli(probs, num_samples, seed_t)


# ---------------------------------------------------------------- the energy network


def _default_feature_net(n_features: int, hidden: int, dropout: float) -> nn.Module:
    """T: 2 layers, softplus, dropout after the first (the authors' bibtex configuration)."""
    net = nn.Sequential(nn.Linear(n_features, hidden), nn.Softplus(), nn.Dropout(dropout),
                        nn.Linear(hidden, hidden), nn.Softplus())
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


class EnergyNet(nn.Module):
    """SEAL's / SPEN's structured energy for multi-label classification, as a *score* s = -E.

        s(x, y) = sum_i y_i b_i^T T(x) + c2^T softplus(C1 y + b1)  [+ d2^T softplus(D1 [y; T(x)] + d1)]

    y may be relaxed (in [0, 1]^L) or binary, (B, L) or (B, K, L) (K label vectors per example).

    Args:
        n_features: input size. n_labels: L.
        feature_net: T; default a 2-layer softplus MLP of `hidden` units with dropout `dropout`
            after the first layer. feature_dim: T's output size (inferred when omitted).
        global_hidden: H, the global term's hidden size (200-400 in the paper); c2 ~ N(0, 2/H).
        conditional_hidden: size of SPEN's conditional global term (0: none, SEAL's energy).
    """

    def __init__(self, n_features: int, n_labels: int, *, feature_net: Optional[nn.Module] = None,
                 feature_dim: Optional[int] = None, hidden: int = 400, dropout: float = 0.5,
                 global_hidden: int = 200, conditional_hidden: int = 0):
        super().__init__()
        for name, v, lo in (("n_features", n_features, 1), ("n_labels", n_labels, 1), ("hidden", hidden, 1),
                            ("global_hidden", global_hidden, 1), ("conditional_hidden", conditional_hidden, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        _validate.number("dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        self.n_features, self.n_labels = n_features, n_labels
        if feature_net is None:
            feature_net = _default_feature_net(n_features, hidden, dropout)
            feature_dim = hidden
        elif feature_dim is None:
            feature_dim = self._infer_feature_dim(feature_net, n_features)
        self.feature_net = feature_net
        self.feature_dim = feature_dim
        self.label_embeddings = nn.Linear(feature_dim, n_labels, bias=False)  # rows are b_i
        self.global_linear = nn.Linear(n_labels, global_hidden)  # C1, b1
        nn.init.kaiming_uniform_(self.global_linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.global_linear.bias)
        self.global_out = nn.Parameter(torch.randn(global_hidden) * math.sqrt(2.0 / global_hidden))  # c2
        self.conditional_hidden = conditional_hidden
        if conditional_hidden:
            self.conditional_linear = nn.Linear(n_labels + feature_dim, conditional_hidden)  # D1, d1
            self.conditional_out = nn.Parameter(torch.randn(conditional_hidden) * math.sqrt(2.0 / conditional_hidden))

    @staticmethod
    def _infer_feature_dim(net: nn.Module, n_features: int) -> int:
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                p = next(iter(net.parameters()), None)
                probe = torch.zeros(1, n_features, dtype=p.dtype if p is not None else torch.float32,
                                    device=p.device if p is not None else None)
                out = net(probe)
        finally:
            net.train(was_training)
        if out.dim() != 2:
            raise ValueError(f"feature_net must map (B, n_features) to (B, D), got output shape {tuple(out.shape)}")
        return out.shape[1]

    @property
    def fused_supported(self) -> bool:
        """Whether the fused NCE kernel can score this energy (no conditional term)."""
        return self.conditional_hidden == 0

    def features(self, x: Tensor) -> Tensor:
        """T(x), (B, D)."""
        _validate.tensor("x", x, ndim=2, floating=True)
        if x.shape[1] != self.n_features:
            raise ValueError(f"x must be (B, n_features) with n_features = {self.n_features}, got {tuple(x.shape)}")
        return self.feature_net(x)

    def unary(self, x: Tensor) -> Tensor:
        """u = T(x) B^T, (B, L): s_local(x, y) = u . y."""
        return self.label_embeddings(self.features(x))

    def global_score(self, y: Tensor) -> Tensor:
        return _ref.global_score(y, self.global_linear.weight, self.global_linear.bias, self.global_out)

    def conditional_score(self, features: Tensor, y: Tensor) -> Tensor:
        if not self.conditional_hidden:
            return y.new_zeros(y.shape[:-1])
        f = features.unsqueeze(1).expand(*y.shape[:-1], features.shape[-1]) if y.dim() == 3 else features
        h = self.conditional_linear(torch.cat([y, f], dim=-1))
        return F.softplus(h) @ self.conditional_out

    def _check_y(self, y: Tensor, batch: int) -> None:
        _validate.tensor("y", y, floating=True)
        if y.dim() not in (2, 3) or y.shape[0] != batch or y.shape[-1] != self.n_labels:
            raise ValueError(f"y must be (B, L) or (B, K, L) with B = {batch}, L = {self.n_labels}, "
                             f"got {tuple(y.shape)}")

    def score_from_features(self, features: Tensor, y: Tensor) -> Tensor:
        u = self.label_embeddings(features)
        s = _ref.local_score(u, y) + self.global_score(y)
        if self.conditional_hidden:
            s = s + self.conditional_score(features, y)
        return s

    def score(self, x: Tensor, y: Tensor) -> Tensor:
        """s(x, y) = -E(x, y): (B,) for y (B, L), (B, K) for y (B, K, L)."""
        f = self.features(x)
        self._check_y(y, f.shape[0])
        return self.score_from_features(f, y)

    def energy(self, x: Tensor, y: Tensor) -> Tensor:
        """E(x, y) = -s(x, y)."""
        return -self.score(x, y)

    forward = score

    def score_grad_y(self, features: Tensor, y: Tensor, unary: Optional[Tensor] = None) -> Tensor:
        """d s / d y at (features = T(x), y (B, L)), in closed form:
        u + C1^T (c2 * sigmoid(C1 y + b1)) [+ D1_y^T (d2 * sigmoid(D1 [y; T(x)] + d1))]
        (pass unary = u to skip recomputing it)."""
        u = self.label_embeddings(features) if unary is None else unary
        g = u + (torch.sigmoid(self.global_linear(y)) * self.global_out) @ self.global_linear.weight
        if self.conditional_hidden:
            h = self.conditional_linear(torch.cat([y, features], dim=-1))
            w_y = self.conditional_linear.weight[:, : self.n_labels]
            g = g + (torch.sigmoid(h) * self.conditional_out) @ w_y
        return g


class CostAugmentedNet(nn.Module):
    """InfNet's cost-augmented inference network: y_ca = sigmoid(FF([F(x); y*])), with F(x) the
    task-net's logits (B, L) and y* the gold labels."""

    def __init__(self, n_labels: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * n_labels, hidden), nn.Softplus(), nn.Linear(hidden, n_labels))

    def forward(self, task_logits: Tensor, labels: Tensor) -> Tensor:
        return torch.sigmoid(self.net(torch.cat([task_logits, labels.to(task_logits.dtype)], dim=-1)))


# ---------------------------------------------------------------- losses on an EnergyNet


def _check_energy_inputs(energy, x, probs_name, probs, labels):
    if not isinstance(energy, EnergyNet):
        raise TypeError(f"energy must be a structloss_fast.EnergyNet, got {type(energy).__name__}")
    _validate.tensor("x", x, ndim=2, floating=True)
    _validate.tensor(probs_name, probs, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=2, floating=True)
    if probs.shape != (x.shape[0], energy.n_labels):
        raise ValueError(f"{probs_name} must be (B, L) = ({x.shape[0]}, {energy.n_labels}), got {tuple(probs.shape)}")
    _same_shape("labels", labels, probs.shape, probs_name)
    _check_values(probs_name, probs)
    _check_values("labels", labels)


def nce_ranking_loss(
    energy: EnergyNet,
    x: Tensor,
    probs: Tensor,
    labels: Tensor,
    *,
    num_samples: Optional[int] = None,
    samples: Optional[Tensor] = None,
    use_logq: bool = True,
    reduction: str = "sum",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tensor:
    """SEAL's noise-contrastive ranking loss of the loss-net `energy` (see `sampled_nce_loss`):
    K samples from Bernoulli(probs) (probs = sigmoid(F(x)), a constant), gold at index 0,
    log q correction (use_logq=False: the ranking variant). The unary term goes through
    autograd (T and the label embeddings), the samples through the fused kernel. An energy with
    SPEN's conditional term is scored by the reference (backend "auto"/"reference")."""
    _check_energy_inputs(energy, x, "probs", probs, labels)
    if not energy.fused_supported:
        if backend not in ("auto", "reference"):
            raise _registry.BackendUnavailable(
                f"backend={backend!r}: the fused kernel scores local + global energies; this EnergyNet has a "
                "conditional term (conditional_hidden > 0): use backend='auto' or 'reference'")
        f = energy.features(x)
        K = samples.shape[1] if samples is not None else (num_samples or 20)
        if samples is None:
            if isinstance(K, bool) or not isinstance(K, int) or K < 1:
                raise ValueError(f"num_samples (K) must be an int >= 1, got {K!r}")
            y = seal_bernoulli(probs.detach(), K, generator=generator)
        else:
            y = samples.to(probs.dtype)
        yy = torch.cat([labels.to(y.dtype).unsqueeze(1), y], dim=1)
        z, = _oplib.loss_inputs(energy.score_from_features(f, yy))
        with _oplib.autocast_off(x.device):
            if use_logq:
                z = z - _ref.log_q(probs.detach(), yy)
            return _ref.reduce(torch.logsumexp(z, 1) - z[:, 0], _reduction(reduction))
    unary = energy.unary(x)
    return _sampled_nce_loss(unary, probs, labels, energy.global_linear.weight, energy.global_linear.bias,
                             energy.global_out, num_samples, samples, use_logq, reduction, generator, backend,
                             check_values=False)


class NCERankingLoss(nn.Module):
    """Module form of `nce_ranking_loss`: loss_fn(energy, x, probs, labels)."""

    def __init__(self, num_samples: int = 20, use_logq: bool = True, reduction: str = "sum", backend: str = "auto"):
        super().__init__()
        self.num_samples, self.use_logq, self.reduction, self.backend = num_samples, use_logq, reduction, backend

    def forward(self, energy, x, probs, labels, samples=None, generator=None):
        return nce_ranking_loss(energy, x, probs, labels, num_samples=None if samples is not None else self.num_samples,
                                samples=samples, use_logq=self.use_logq, reduction=self.reduction,
                                generator=generator, backend=self.backend)

    def extra_repr(self):
        return (f"num_samples={self.num_samples}, use_logq={self.use_logq}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


def regression_loss(energy: EnergyNet, x: Tensor, probs: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
    """DVN-style regression loss of the loss-net: BCEWithLogits(s(x, p), soft-F1(p, y*)).
    Pass probs detached to train only the energy (SEAL's loss-net update)."""
    _check_energy_inputs(energy, x, "probs", probs, labels)
    score, probs, labels = _oplib.loss_inputs(energy.score(x, probs.to(x.dtype)), probs, labels)
    with _oplib.autocast_off(x.device):
        return _ref.regression_loss(score, probs, labels, reduction=_reduction(reduction))


def margin_loss(energy: EnergyNet, x: Tensor, labels: Tensor, cost_augmented: Tensor, *,
                prediction: Optional[Tensor] = None, lambda_p: float = 0.0, delta: str = "manhattan",
                reduction: str = "mean") -> Tensor:
    """Margin-rescaled, zero-truncated SSVM / InfNet loss:
    relu(Delta(y_ca, y*) - s(y*) + s(y_ca)) + lambda_p relu(s(y^) - s(y*)).

    Args:
        cost_augmented: y_ca (B, L) in [0, 1] (from `CostAugmentedNet`, or cost-augmented GBI).
        prediction: y^ (B, L), the task-net's output, for the lambda_p term.
        delta: "manhattan" (mean absolute difference, SEAL/InfNet) or "soft_f1" (1 - soft-F1, SPEN).
    """
    _check_energy_inputs(energy, x, "cost_augmented", cost_augmented, labels)
    lambda_p = _validate.number("lambda_p", lambda_p, lo=0.0)
    if delta not in ("manhattan", "soft_f1"):
        raise ValueError(f"delta must be 'manhattan' or 'soft_f1', got {delta!r}")
    if prediction is not None:
        _validate.tensor("prediction", prediction, ndim=2, floating=True)
        _same_shape("prediction", prediction, labels.shape, "labels")
        _check_values("prediction", prediction)
    dfn = _ref.manhattan_delta if delta == "manhattan" else _ref.soft_f1_delta
    f = energy.features(x)
    # Labels and relaxed label vectors are scored in the features' dtype (any floating dtype is taken).
    cost_augmented = cost_augmented.to(f.dtype)
    y_star = labels.to(f.dtype)
    ys = [y_star, cost_augmented] + ([prediction.to(f.dtype)] if prediction is not None else [])
    scores = energy.score_from_features(f, torch.stack(ys, dim=1))  # one pass of T for all three
    scores, cost_augmented, y_star = _oplib.loss_inputs(scores, cost_augmented, y_star)
    s_pred = scores[:, 2] if prediction is not None else None
    with _oplib.autocast_off(x.device):
        return _ref.margin_loss(scores[:, 0], scores[:, 1], dfn(cost_augmented, y_star), s_pred, lambda_p=lambda_p,
                                reduction=_reduction(reduction))


def seal_task_loss(energy: EnergyNet, x: Tensor, logits: Tensor, labels: Tensor, *, weight: float = 1.0,
                   variant: str = "score", reduction: str = "mean") -> Tensor:
    """The task-net's loss L_F = w * (-s(x, sigmoid(F(x)))) + sum_l BCEWithLogits(F(x)_l, y_l)
    (variant "regression": -sigmoid(s)). Gradients reach `logits` through the energy term; to
    keep the loss-net fixed, freeze its parameters (the trainers do)."""
    if not isinstance(energy, EnergyNet):
        raise TypeError(f"energy must be a structloss_fast.EnergyNet, got {type(energy).__name__}")
    _validate.tensor("logits", logits, ndim=2, floating=True)
    _validate.tensor("labels", labels, ndim=2, floating=True)
    if logits.shape != (x.shape[0], energy.n_labels):
        raise ValueError(f"logits must be (B, L) = ({x.shape[0]}, {energy.n_labels}), got {tuple(logits.shape)}")
    _same_shape("labels", labels, logits.shape, "logits")
    _check_values("labels", labels)
    weight = _validate.number("weight", weight, lo=0.0)
    if variant not in ("score", "regression"):
        raise ValueError(f"variant must be 'score' or 'regression', got {variant!r}")
    s, logits, labels = _oplib.loss_inputs(energy.score(x, torch.sigmoid(logits).to(x.dtype)), logits, labels)
    with _oplib.autocast_off(x.device):
        return _ref.task_loss(logits, labels, s, weight=weight, variant=variant, reduction=_reduction(reduction))


# ---------------------------------------------------------------- SPEN gradient-based inference


@torch.no_grad()
def gbi_inference(energy: EnergyNet, x: Tensor, *, steps: int = 20, step_size: float = 0.5,
                  method: str = "entropic", init="uniform", cost_labels: Optional[Tensor] = None,
                  cost: str = "soft_f1", return_trace: bool = False):
    """SPEN's gradient-based inference: maximise s(x, y) (minimise E) over y in [0, 1]^L.

    method "entropic" (mirror descent with the Bernoulli-entropy mirror map):
        y <- sigmoid(logit(y) + 2 eta grad_y s);
    method "projected": y <- clamp(y + eta grad_y s, 1e-3, 1 - 1e-3).
    The features T(x) are computed once; grad_y s is taken in closed form (EnergyNet.score_grad_y).
    With cost_labels (y*), the objective is the cost-augmented s(x, y) + Delta(y, y*)
    (Delta = 1 - soft-F1 or the manhattan distance), for SSVM training.

    Returns y (B, L), and with return_trace the list of objective values (B,) per step (the first
    at the initial point).
    """
    if not isinstance(energy, EnergyNet):
        raise TypeError(f"energy must be a structloss_fast.EnergyNet, got {type(energy).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    eta = _validate.number("step_size", step_size, lo=0.0, lo_open=True)
    if method not in ("entropic", "projected"):
        raise ValueError(f"method must be 'entropic' or 'projected', got {method!r}")
    if cost not in ("soft_f1", "manhattan"):
        raise ValueError(f"cost must be 'soft_f1' or 'manhattan', got {cost!r}")
    f = energy.features(x)
    B, L = f.shape[0], energy.n_labels
    if isinstance(init, Tensor):
        if init.shape != (B, L):
            raise ValueError(f"init must be (B, L) = ({B}, {L}), got {tuple(init.shape)}")
        _check_values("init", init)
        y = init.to(f.dtype).clamp(1e-3, 1 - 1e-3)
    elif init == "uniform":
        y = f.new_full((B, L), 0.5)
    elif init == "unary":
        y = torch.sigmoid(energy.label_embeddings(f))
    else:
        raise ValueError(f"init must be 'uniform', 'unary' or a (B, L) tensor, got {init!r}")
    if cost_labels is not None:
        _validate.tensor("cost_labels", cost_labels, ndim=2, floating=True)
        _same_shape("cost_labels", cost_labels, (B, L), "the prediction")
        cost_labels = cost_labels.to(f.dtype)

    def objective(y):
        s = energy.score_from_features(f, y)
        if cost_labels is not None:
            s = s + (_ref.soft_f1_delta(y, cost_labels) if cost == "soft_f1" else _ref.manhattan_delta(y, cost_labels))
        return s

    unary = energy.label_embeddings(f)

    def gradient(y):
        g = energy.score_grad_y(f, y, unary)
        if cost_labels is not None:
            with torch.enable_grad():
                yy = y.detach().requires_grad_(True)
                d = _ref.soft_f1_delta(yy, cost_labels) if cost == "soft_f1" else _ref.manhattan_delta(yy, cost_labels)
                g = g + torch.autograd.grad(d.sum(), yy)[0]
        return g

    trace = [objective(y)] if return_trace else None
    theta = torch.logit(y) if method == "entropic" else None  # the mirror (natural) parameter of y
    for _ in range(steps):
        g = gradient(y)
        if method == "entropic":
            theta = theta + 2 * eta * g
            y = torch.sigmoid(theta)
        else:
            y = (y + eta * g).clamp(1e-3, 1 - 1e-3)
        if return_trace:
            trace.append(objective(y))
    return (y, trace) if return_trace else y
