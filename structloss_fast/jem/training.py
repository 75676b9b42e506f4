"""JEM: a classifier as an energy-based model (Grathwohl et al., ICLR 2020; docs/spec/jem.md).

- `ReplayBuffer`: the persistent SGLD buffer (on the model's device), sampled with replacement,
  chains re-initialised with probability `reinit_freq`, per-class blocks for class-conditional
  sampling, deterministic write-back.
- `SGLDSampler`: SGLD chains on the model's log-density with the fused `sgld_step_` (model in
  eval mode, gradient wrt x only, no retain_graph; optional CUDA-graph capture of the chain).
- `jem_loss`: the authors' objective from logits, with an optional L2 penalty on the energies.
- `JEMTrainer`: the training loop with the authors' defaults, divergence detection that stops
  with a clear message, and a tqdm progress bar.

Energies: E(x) = -LSE_y f(x)[y] (p(x)), E(x, y) = -f(x)[y] (p(x, y)).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _oplib, _validate
from .._train import progress_bar
from .sgld import SGLD_VARIANTS, check_step_args, resolve_backend, sgld_step_

__all__ = [
    "ReplayBuffer", "SGLDSampler", "JEMTrainer", "JEMDivergenceError", "jem_loss", "class_gaussian_init",
    "uniform_init", "energy_lse",
]


# ---------------------------------------------------------------- energies


def energy_lse(logits: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """log p(x) up to a constant, per sample: LSE_y f(x)[y]; with labels y, log p(x, y): f(x)[y]."""
    if y is None:
        return logits.logsumexp(1)
    return logits.gather(1, y.view(-1, 1)).squeeze(1)


# ---------------------------------------------------------------- the replay buffer


def uniform_init(n: int, shape, *, device=None, dtype=torch.float32, generator=None, y=None) -> Tensor:
    """U(-1, 1) samples (n, *shape): the authors' initialisation."""
    return torch.rand((n, *shape), device=device, dtype=dtype, generator=generator).mul_(2).sub_(1)


class class_gaussian_init:
    """JEM++'s informative initialisation: a Gaussian per class fitted to the training data
    (full covariance + jitter), samples clamped to [-1, 1]. Called as init(n, y=None): class y
    (LongTensor (n,)) or classes drawn uniformly."""

    def __init__(self, x: Tensor, y: Tensor, n_classes: int, *, jitter: float = 1e-4, clamp=(-1.0, 1.0)):
        _validate.tensor("x", x, floating=True)
        _validate.tensor("y", y, ndim=1, integer=True)
        _validate.length("y", y, x.shape[0], "x")
        self.shape = tuple(x.shape[1:])
        self.n_classes = int(n_classes)
        flat = x.reshape(x.shape[0], -1).double()
        d = flat.shape[1]
        means, chols = [], []
        for c in range(self.n_classes):
            xc = flat[y == c]
            if xc.shape[0] < 2:
                raise ValueError(f"class {c} has {xc.shape[0]} training samples; a Gaussian needs at least 2")
            mean = xc.mean(0)
            cov = (xc - mean).T @ (xc - mean) / xc.shape[0] + jitter * torch.eye(d, dtype=torch.float64, device=x.device)
            means.append(mean)
            chols.append(torch.linalg.cholesky(cov))
        self.means = torch.stack(means)
        self.chols = torch.stack(chols)
        self.clamp = clamp
        self.dtype = x.dtype

    def __call__(self, n: int, *, device=None, dtype=None, generator=None, y: Optional[Tensor] = None) -> Tensor:
        dev = self.means.device
        if y is None:
            y = torch.randint(0, self.n_classes, (n,), device=dev, generator=generator)
        y = y.to(dev)
        z = torch.randn((n, self.means.shape[1]), dtype=torch.float64, device=dev, generator=generator)
        out = self.means[y] + torch.einsum("nij,nj->ni", self.chols[y], z)
        if self.clamp is not None:
            out = out.clamp(*self.clamp)
        return out.reshape((n, *self.shape)).to(device=device or dev, dtype=dtype or self.dtype)


class ReplayBuffer:
    """The persistent SGLD buffer.

    Args:
        size: number of stored samples (authors: 10000).
        sample_shape: shape of one sample, e.g. (3, 32, 32).
        reinit_freq: probability that a drawn chain restarts from the initial distribution (0.05).
        n_classes: class-conditional mode: the buffer is split into n_classes equal contiguous
            blocks (size must be a multiple), and sample(y=...) draws from block y.
        init: "uniform" (U(-1, 1)) or a callable init(n, *, device, dtype, generator, y) -> (n, *sample_shape)
            (e.g. class_gaussian_init for JEM++; y is the class of each sample in
            class-conditional mode, else None).
        device, dtype: where the buffer lives (keep it on the model's device).
        generator: torch.Generator for index draws, re-initialisation and init.
    """

    def __init__(self, size: int, sample_shape, *, reinit_freq: float = 0.05, n_classes: Optional[int] = None,
                 init: Union[str, Callable] = "uniform", device=None, dtype=torch.float32,
                 generator: Optional[torch.Generator] = None):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if any(s < 1 for s in self.sample_shape):
            raise ValueError(f"sample_shape must have positive sizes, got {tuple(sample_shape)}")
        self.reinit_freq = _validate.number("reinit_freq", reinit_freq, lo=0.0, hi=1.0)
        if n_classes is not None:
            if not isinstance(n_classes, int) or n_classes < 1:
                raise ValueError(f"n_classes must be a positive int or None, got {n_classes!r}")
            if size % n_classes != 0:
                raise ValueError(f"size ({size}) must be a multiple of n_classes ({n_classes}) for equal per-class blocks")
        if dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if init == "uniform":
            self._init = uniform_init
        elif callable(init):
            self._init = init
        else:
            raise ValueError(f"init must be 'uniform' or a callable, got {init!r}")
        self.size = size
        self.n_classes = n_classes
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.generator = generator
        y_all = None
        if n_classes is not None:
            y_all = torch.arange(n_classes, device=self.device).repeat_interleave(size // n_classes)
        self.buffer = self._fresh(size, y_all)

    @property
    def per_class(self) -> int:
        return self.size // self.n_classes if self.n_classes else self.size

    def _fresh(self, n: int, y: Optional[Tensor]) -> Tensor:
        if self._init is uniform_init:
            return uniform_init(n, self.sample_shape, device=self.device, dtype=self.dtype, generator=self.generator)
        out = self._init(n, device=self.device, dtype=self.dtype, generator=self.generator, y=y)
        if not isinstance(out, Tensor) or tuple(out.shape) != (n, *self.sample_shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"init must return a tensor of shape {(n, *self.sample_shape)}, got {got}")
        return out.to(device=self.device, dtype=self.dtype)

    def sample(self, batch_size: Optional[int] = None, y: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Draws chains: (x0 (B, *sample_shape), indices (B,)). Indices are drawn with
        replacement (uniformly, or within class y's block); each chain is replaced by a fresh
        initial sample with probability reinit_freq. x0 is a new tensor (the buffer is not
        touched until update())."""
        if y is not None:
            if self.n_classes is None:
                raise ValueError("y given, but the buffer is not class-conditional (n_classes=None)")
            _validate.tensor("y", y, ndim=1, integer=True)
            if batch_size is not None and batch_size != y.shape[0]:
                raise ValueError(f"batch_size ({batch_size}) must equal len(y) ({y.shape[0]})")
            batch_size = y.shape[0]
            y = y.to(self.device)
            idx = y * self.per_class + torch.randint(0, self.per_class, (batch_size,), device=self.device,
                                                     generator=self.generator)
        else:
            if not isinstance(batch_size, int) or batch_size < 0:
                raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
            idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=self.generator)
        x0 = self.buffer.index_select(0, idx)
        if self.reinit_freq > 0:
            restart = torch.rand(batch_size, device=self.device, generator=self.generator) < self.reinit_freq
            y_fresh = y if y is not None else (idx // self.per_class if self.n_classes else None)
            fresh = self._fresh(batch_size, y_fresh)
            x0 = torch.where(restart.view(-1, *([1] * len(self.sample_shape))), fresh, x0)
        return x0, idx

    def update(self, idx: Tensor, samples: Tensor) -> None:
        """Writes samples back at idx. With duplicate indices the last occurrence wins (as a
        sequential write would), deterministically and without a host synchronisation."""
        _validate.tensor("idx", idx, ndim=1, integer=True)
        _validate.tensor("samples", samples, floating=True)
        if tuple(samples.shape) != (idx.shape[0], *self.sample_shape):
            raise ValueError(f"samples must have shape {(idx.shape[0], *self.sample_shape)}, got {tuple(samples.shape)}")
        idx = idx.to(self.device)
        order = torch.arange(idx.shape[0], device=self.device)
        last = torch.full((self.size,), -1, dtype=torch.long, device=self.device)
        last.scatter_reduce_(0, idx, order, reduce="amax")
        winner = last.index_select(0, idx)
        self.buffer.index_copy_(0, idx, samples.detach().to(self.buffer.dtype).index_select(0, winner))

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "n_classes": self.n_classes, "reinit_freq": self.reinit_freq}

    def load_state_dict(self, state: dict) -> None:
        buf = state["buffer"]
        if tuple(buf.shape) != (self.size, *self.sample_shape):
            raise ValueError(f"buffer in state has shape {tuple(buf.shape)}, expected {(self.size, *self.sample_shape)}")
        self.buffer.copy_(buf)


# ---------------------------------------------------------------- the sampler


# "take this argument from the variant's preset"
PRESET = "preset"


class SGLDSampler:
    """SGLD chains on log p(x) = LSE_y f(x)[y] (or log p(x, y) = f(x)[y] when sampling with labels).

    Args:
        model: the classifier f; model(x) returns logits (B, n_classes).
        buffer: a ReplayBuffer (persistent chains), or None for short-run chains from U(-1, 1)
            of shape (B, *sample_shape) on `device` (or from x_init).
        n_steps: SGLD steps per call (authors: 20 persistent, 100 short-run).
        variant: "jem" | "jem++" | "sada-jem" | "langevin" (SGLD_VARIANTS): the defaults of the
            arguments below (PRESET = take the variant's value); any of them can be overridden.
        step_size, noise_std, grad_clamp, x_clamp, noise_after_clamp, form: as in sgld_step_.
        energy: log_density(logits, y) -> (B,); default energy_lse.
        cuda_graph: on CUDA, capture the whole chain (n_steps forward/backward/steps) in a CUDA
            graph once per (batch size, conditional) and replay it; the model's parameters may
            change between calls (they are read at replay) but not be reallocated, and the model
            must not have data-dependent control flow. Ignored on CPU.
        generator: torch.Generator for the SGLD noise (default: the device's default generator).
        backend: backend of sgld_step_ ("auto" | "reference" | "cpu" | "cuda").

    The model is put in eval mode during sampling and restored afterwards; gradients are taken
    wrt x only (no parameter gradients are formed or touched) and no graph is retained.
    """

    def __init__(self, model: nn.Module, buffer: Optional[ReplayBuffer] = None, *, n_steps: int = 20,
                 variant: str = "jem", step_size=PRESET, noise_std=PRESET, grad_clamp=PRESET, x_clamp=PRESET,
                 noise_after_clamp=PRESET, form=PRESET, energy: Optional[Callable] = None,
                 sample_shape=None, device=None, cuda_graph: bool = False,
                 generator: Optional[torch.Generator] = None, backend: str = "auto"):
        if variant not in SGLD_VARIANTS:
            raise ValueError(f"variant must be one of {tuple(SGLD_VARIANTS)}, got {variant!r}")
        preset = SGLD_VARIANTS[variant]
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        self.model = model
        self.buffer = buffer
        self.n_steps = n_steps
        self.variant = variant
        pick = lambda value, key: preset[key] if isinstance(value, str) and value == PRESET else value  # noqa: E731
        self.step_size = pick(step_size, "step_size")
        self.noise_std = pick(noise_std, "noise_std")
        self.grad_clamp = pick(grad_clamp, "grad_clamp")
        self.x_clamp = pick(x_clamp, "x_clamp")
        self.noise_after_clamp = pick(noise_after_clamp, "noise_after_clamp")
        self.form = pick(form, "form")
        if buffer is not None:
            self.sample_shape, self.device = buffer.sample_shape, buffer.device
        else:
            self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.energy = energy or energy_lse
        self.cuda_graph = bool(cuda_graph)
        self.generator = generator
        self.backend = backend
        # validated once here; the chain then calls the op directly
        probe = torch.zeros(1)
        self._coefs = check_step_args(
            probe, probe, step_size=self.step_size, noise_std=self.noise_std, grad_clamp=self.grad_clamp,
            x_clamp=self.x_clamp, noise_after_clamp=self.noise_after_clamp, form=self.form, noise=None,
            generator=None,
        )
        self._graphs: dict = {}

    def step_kwargs(self) -> dict:
        """The arguments of sgld_step_ that this sampler uses."""
        return dict(step_size=self.step_size, noise_std=self.noise_std, grad_clamp=self.grad_clamp,
                    x_clamp=self.x_clamp, noise_after_clamp=self.noise_after_clamp, form=self.form)

    def _step_fn(self, x: Tensor):
        """One in-place step function for x's device, validated once (no per-step checks)."""
        a, b, gclamp, xclamp = self._coefs
        chosen = resolve_backend(self.backend, x.device)
        gen = self.generator
        if gen is not None and gen.device.type != x.device.type:
            raise ValueError(f"generator is a {gen.device.type} generator, the samples are on {x.device}")
        if chosen == "reference":
            kw = self.step_kwargs()

            def step(xd, g):
                sgld_step_(xd, g, generator=gen, backend="reference", **kw)
            return step
        op = torch.ops.structloss_fast.sgld_step_
        gl, xl, nac = list(gclamp or ()), list(xclamp or ()), bool(self.noise_after_clamp)

        def step(xd, g):
            op(xd, g, None, a, b, gl, xl, nac, gen, [])
        return step

    def _chain(self, x: Tensor, y: Optional[Tensor], step) -> None:
        """n_steps in place on the leaf x (requires_grad)."""
        for _ in range(self.n_steps):
            with torch.enable_grad():
                log_p = self.energy(self.model(x), y).sum()
                grad, = torch.autograd.grad(log_p, [x])
            step(x.detach(), grad)

    def run_chain(self, x0: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Runs n_steps from x0 (not modified) and returns the final samples (detached)."""
        _validate.tensor("x0", x0, floating=True)
        if y is not None:
            _validate.tensor("y", y, ndim=1, integer=True)
            _validate.length("y", y, x0.shape[0], "x0")
        was_training = self.model.training
        self.model.eval()
        try:
            if self.cuda_graph and x0.is_cuda:
                return self._run_graphed(x0, y)
            x = x0.detach().clone().requires_grad_(True)
            self._chain(x, y, self._step_fn(x))
            return x.detach()
        finally:
            self.model.train(was_training)

    def sample(self, batch_size: Optional[int] = None, y: Optional[Tensor] = None,
               x_init: Optional[Tensor] = None) -> Tensor:
        """Samples: draws chains from the buffer (or x_init, or U(-1, 1) without a buffer), runs
        n_steps of SGLD, writes the final samples back to the buffer, returns them (detached).
        With y (LongTensor (B,)), samples p(x | y): class blocks of the buffer, energy f(x)[y]."""
        idx = None
        if x_init is not None:
            x0 = x_init
        elif self.buffer is not None:
            x0, idx = self.buffer.sample(batch_size, y)
        else:
            if batch_size is None and y is not None:
                batch_size = y.shape[0]
            if batch_size is None:
                raise ValueError("batch_size is required without a buffer, x_init or y")
            if self.sample_shape is None:
                raise ValueError("without a buffer, give the sampler a sample_shape (or pass x_init)")
            gen = self.generator if self.generator is not None and self.generator.device.type == self.device.type else None
            x0 = uniform_init(batch_size, self.sample_shape, device=self.device, generator=gen)
        samples = self.run_chain(x0, y)
        if idx is not None:
            self.buffer.update(idx, samples)
        return samples

    # -- CUDA graphs
    def _run_graphed(self, x0: Tensor, y: Optional[Tensor]) -> Tensor:  # pragma: no cover - needs a GPU
        key = (tuple(x0.shape), x0.dtype, x0.device, y is not None)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x0, y)
            self._graphs[key] = entry
        graph, static_x, static_y = entry
        with torch.no_grad():
            static_x.copy_(x0)
            if static_y is not None:
                static_y.copy_(y)
        graph.replay()
        return static_x.detach().clone()

    def _capture(self, x0: Tensor, y: Optional[Tensor]):  # pragma: no cover - needs a GPU
        if self.generator is not None and hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            graph_gen = self.generator
        else:
            graph_gen = None
        static_x = x0.detach().clone().requires_grad_(True)
        static_y = None if y is None else y.detach().clone()
        step = self._step_fn(static_x)
        # warm-up on a side stream (allocator, cuBLAS/cuDNN workspaces, autograd), as
        # torch.cuda.graphs requires, on a copy so that the caller's x0 is not consumed
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = x0.detach().clone().requires_grad_(True)
            saved, self.n_steps = self.n_steps, min(self.n_steps, 2)
            try:
                self._chain(warm, static_y, step)
            finally:
                self.n_steps = saved
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if graph_gen is not None:
            graph.register_generator_state(graph_gen)
        with torch.cuda.graph(graph):
            self._chain(static_x, static_y, step)
        return graph, static_x, static_y


# ---------------------------------------------------------------- the objective


def jem_loss(logits_data: Tensor, logits_samples: Optional[Tensor], labels: Optional[Tensor] = None, *,
             logits_labeled: Optional[Tensor] = None, logits_samples_y: Optional[Tensor] = None,
             y_samples: Optional[Tensor] = None, p_x_weight: float = 1.0, p_y_given_x_weight: float = 1.0,
             p_x_y_weight: float = 0.0, energy_l2: float = 0.0, return_parts: bool = False):
    """The JEM objective (authors' defaults: p_x_weight = p_y_given_x_weight = 1, p_x_y_weight = 0):

        L = p_x_weight * (-mean LSE f(x_data) + mean LSE f(x_samples))
          + p_y_given_x_weight * CE(f(x_lab), y_lab)
          + p_x_y_weight * (-mean f(x_lab)[y_lab] + mean f(x_samples_y)[y_samples])
          + energy_l2 * (mean LSE f(x_data)^2 + mean LSE f(x_samples)^2)

    Args:
        logits_data: f(x_data) (B, C), the data batch of the p(x) term.
        logits_samples: f(x_samples) (M, C), SGLD samples (detached from the chain); None when
            p_x_weight == 0.
        labels: y_lab (B_lab,), labels of the labeled batch, whose logits are logits_labeled,
            or logits_data when logits_labeled is None (one forward for both terms).
        logits_samples_y, y_samples: class-conditional samples and their classes (p(x, y) term).
        energy_l2: weight of the L2 penalty on the energies (the authors suggest about 0.1 as a
            stabiliser); 0 = the original objective.
        return_parts: also return a dict of the (detached) terms.
    """
    _validate.tensor("logits_data", logits_data, ndim=2, floating=True)
    p_x_weight = _validate.number("p_x_weight", p_x_weight, lo=0.0)
    p_y_given_x_weight = _validate.number("p_y_given_x_weight", p_y_given_x_weight, lo=0.0)
    p_x_y_weight = _validate.number("p_x_y_weight", p_x_y_weight, lo=0.0)
    energy_l2 = _validate.number("energy_l2", energy_l2, lo=0.0)
    n_classes = logits_data.shape[1]
    logits_lab = logits_data if logits_labeled is None else logits_labeled
    if logits_labeled is not None:
        _validate.tensor("logits_labeled", logits_labeled, ndim=2, floating=True)
    need_labels = p_y_given_x_weight > 0 or p_x_y_weight > 0
    if need_labels:
        if labels is None:
            raise ValueError("labels are required when p_y_given_x_weight or p_x_y_weight is > 0")
        _validate.tensor("labels", labels, ndim=1, integer=True)
        _validate.length("labels", labels, logits_lab.shape[0], "logits_labeled" if logits_labeled is not None else "logits_data")
    if p_x_weight > 0 or energy_l2 > 0:
        if logits_samples is None:
            raise ValueError("logits_samples are required when p_x_weight or energy_l2 is > 0")
        _validate.tensor("logits_samples", logits_samples, ndim=2, floating=True)
        if logits_samples.shape[1] != n_classes:
            raise ValueError(f"logits_samples must have {n_classes} classes, got shape {tuple(logits_samples.shape)}")
    # Under autocast: float32, as F.cross_entropy.
    logits_data, logits_samples, logits_labeled, logits_samples_y = _oplib.loss_inputs(
        logits_data, logits_samples, logits_labeled, logits_samples_y)
    with _oplib.autocast_off(logits_data.device):
        return _jem_objective(logits_data, logits_samples, labels, logits_labeled, logits_samples_y, y_samples,
                              p_x_weight, p_y_given_x_weight, p_x_y_weight, energy_l2, return_parts)


def _jem_objective(logits_data, logits_samples, labels, logits_labeled, logits_samples_y, y_samples, p_x_weight,
                   p_y_given_x_weight, p_x_y_weight, energy_l2, return_parts):
    logits_lab = logits_data if logits_labeled is None else logits_labeled
    zero = logits_data.new_zeros(())
    parts = {}
    loss = zero
    lse_data = logits_data.logsumexp(1)
    lse_samples = logits_samples.logsumexp(1) if logits_samples is not None else None
    if p_x_weight > 0:
        l_px = -lse_data.mean() + lse_samples.mean()
        loss = loss + p_x_weight * l_px
        parts["l_p_x"] = l_px.detach()
    if p_y_given_x_weight > 0:
        l_pyx = F.cross_entropy(logits_lab, labels)
        loss = loss + p_y_given_x_weight * l_pyx
        parts["l_p_y_given_x"] = l_pyx.detach()
    if p_x_y_weight > 0:
        if logits_samples_y is None or y_samples is None:
            raise ValueError("p_x_y_weight > 0 needs logits_samples_y and y_samples")
        _validate.tensor("logits_samples_y", logits_samples_y, ndim=2, floating=True)
        _validate.tensor("y_samples", y_samples, ndim=1, integer=True)
        _validate.length("y_samples", y_samples, logits_samples_y.shape[0], "logits_samples_y")
        l_pxy = -energy_lse(logits_lab, labels).mean() + energy_lse(logits_samples_y, y_samples).mean()
        loss = loss + p_x_y_weight * l_pxy
        parts["l_p_x_y"] = l_pxy.detach()
    if energy_l2 > 0:
        l2 = lse_data.pow(2).mean() + lse_samples.pow(2).mean()
        loss = loss + energy_l2 * l2
        parts["energy_l2"] = l2.detach()
    parts["lse_data"] = lse_data.mean().detach()
    if lse_samples is not None:
        parts["lse_samples"] = lse_samples.mean().detach()
    return (loss, parts) if return_parts else loss


# ---------------------------------------------------------------- the trainer


class JEMDivergenceError(RuntimeError):
    """JEM training diverged (non-finite loss or |loss| above the threshold)."""


class JEMTrainer:
    """JEM training with the authors' defaults (Adam lr 1e-4, batch 64, 20 persistent SGLD steps
    of step 1 and noise 0.01, buffer 10000 with reinit 0.05, data noise 0.03, p(x) and p(y|x)
    weights 1, p(x, y) weight 0).

    Args:
        model: the classifier (no BatchNorm recommended, as in the paper).
        n_classes: number of classes.
        sample_shape: shape of one input, e.g. (1, 8, 8).
        lr, betas, weight_decay, optimizer: Adam settings, or a ready optimizer.
        warmup_iters: linear learning-rate warm-up (authors' scripts: 1000 on CIFAR; 0 = none).
        buffer_size, reinit_freq, buffer_init: the replay buffer (buffer_init: "uniform" or a
            callable, e.g. class_gaussian_init(...) for JEM++).
        n_steps, variant, sgld: the sampler (sgld: extra SGLDSampler keyword arguments).
        p_x_weight, p_y_given_x_weight, p_x_y_weight, energy_l2: the objective (jem_loss).
        data_noise: std of the Gaussian noise added to every training batch (0.03).
        class_cond_samples: draw the p(x) samples class-conditionally (y uniform), as the
            authors' --class_cond_p_x_sample.
        divergence_threshold: stop when |loss| exceeds this (authors: 1e8) or is not finite.
        device, generator, progress: where to train; RNG for the buffer, data noise and SGLD;
            show a tqdm bar in fit().
    """

    def __init__(self, model: nn.Module, *, n_classes: int, sample_shape, lr: float = 1e-4, betas=(0.9, 0.999),
                 weight_decay: float = 0.0, optimizer: Optional[torch.optim.Optimizer] = None, warmup_iters: int = 0,
                 buffer_size: int = 10000, reinit_freq: float = 0.05, buffer_init: Union[str, Callable] = "uniform",
                 n_steps: int = 20, variant: str = "jem", sgld: Optional[dict] = None, p_x_weight: float = 1.0,
                 p_y_given_x_weight: float = 1.0, p_x_y_weight: float = 0.0, energy_l2: float = 0.0,
                 data_noise: float = 0.03, class_cond_samples: bool = False, divergence_threshold: float = 1e8,
                 device=None, generator: Optional[torch.Generator] = None, progress: bool = True):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.n_classes = int(n_classes)
        self.sample_shape = tuple(sample_shape)
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr, betas=betas,
                                                       weight_decay=weight_decay)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.warmup_iters = int(warmup_iters)
        self.p_x_weight = _validate.number("p_x_weight", p_x_weight, lo=0.0)
        self.p_y_given_x_weight = _validate.number("p_y_given_x_weight", p_y_given_x_weight, lo=0.0)
        self.p_x_y_weight = _validate.number("p_x_y_weight", p_x_y_weight, lo=0.0)
        self.energy_l2 = _validate.number("energy_l2", energy_l2, lo=0.0)
        self.data_noise = _validate.number("data_noise", data_noise, lo=0.0)
        self.divergence_threshold = _validate.number("divergence_threshold", divergence_threshold, lo=0.0, lo_open=True)
        self.class_cond_samples = bool(class_cond_samples)
        self.generator = generator
        self.progress = progress
        conditional = self.class_cond_samples or self.p_x_y_weight > 0
        self.buffer = ReplayBuffer(buffer_size, self.sample_shape, reinit_freq=reinit_freq,
                                   n_classes=self.n_classes if conditional else None, init=buffer_init,
                                   device=self.device, generator=generator)
        self.sampler = SGLDSampler(self.model, self.buffer, n_steps=n_steps, variant=variant,
                                   generator=generator, **(sgld or {}))
        self.iteration = 0
        self.history: list[dict] = []

    def _set_lr(self) -> None:
        if self.warmup_iters > 0 and self.iteration <= self.warmup_iters:
            scale = self.iteration / self.warmup_iters
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * scale

    def step(self, x: Tensor, y: Tensor) -> dict:
        """One training iteration on a labeled batch (x, y): samples, loss, optimizer step.
        Returns the iteration's statistics (floats). Raises JEMDivergenceError on divergence."""
        _validate.tensor("x", x, floating=True)
        _validate.tensor("y", y, ndim=1, integer=True)
        _validate.length("y", y, x.shape[0], "x")
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must have samples of shape {self.sample_shape}, got {tuple(x.shape)}")
        self._set_lr()
        x = x.to(self.device)
        y = y.to(self.device)
        if self.data_noise > 0:
            x = x + self.data_noise * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=self.generator)
        B = x.shape[0]
        x_q = x_q_y = y_q = None
        if self.p_x_weight > 0 or self.energy_l2 > 0:
            if self.class_cond_samples:
                y_rand = torch.randint(0, self.n_classes, (B,), device=self.device, generator=self.generator)
                x_q = self.sampler.sample(y=y_rand)
            else:
                x_q = self.sampler.sample(B)
        if self.p_x_y_weight > 0:
            y_q = y
            x_q_y = self.sampler.sample(y=y_q)
        self.model.train()
        # one forward for data and samples (same normalisation state, one pass)
        batches = [x] + [t for t in (x_q, x_q_y) if t is not None]
        logits = self.model(torch.cat(batches)) if len(batches) > 1 else self.model(x)
        logits_data = logits[:B]
        off = B
        logits_q = logits_q_y = None
        if x_q is not None:
            logits_q = logits[off:off + x_q.shape[0]]
            off += x_q.shape[0]
        if x_q_y is not None:
            logits_q_y = logits[off:off + x_q_y.shape[0]]
        loss, parts = jem_loss(logits_data, logits_q, y, logits_samples_y=logits_q_y, y_samples=y_q,
                               p_x_weight=self.p_x_weight, p_y_given_x_weight=self.p_y_given_x_weight,
                               p_x_y_weight=self.p_x_y_weight, energy_l2=self.energy_l2, return_parts=True)
        value = loss.item()
        if not math.isfinite(value) or abs(value) > self.divergence_threshold:
            stats = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            raise JEMDivergenceError(
                f"JEM training diverged at iteration {self.iteration}: loss={value:.4g} "
                f"(threshold {self.divergence_threshold:.3g}; {stats}). The energy of the SGLD samples ran away "
                "from the data's. Usual remedies: a lower learning rate, more SGLD steps per iteration, "
                "energy_l2=0.1 (an L2 penalty on the energies), a smaller SGLD step or the 'jem++'/'sada-jem' "
                "variants (clamped gradients and samples); then restart from the last good checkpoint."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        acc = (logits_data.detach().argmax(1) == y).float().mean()
        stats = {"iteration": self.iteration, "loss": value, "acc": acc.item()}
        stats.update({k: v.item() for k, v in parts.items()})
        return stats

    def fit(self, data, epochs: int = 1, *, batch_size: int = 64, shuffle: bool = True,
            callback: Optional[Callable[[dict], None]] = None, desc: str = "JEM") -> list[dict]:
        """Trains for `epochs` over `data`: an iterable of (x, y) batches (e.g. a DataLoader),
        or a tuple of tensors (X, Y) batched here (batch_size, shuffled with the trainer's
        generator). Returns the per-iteration history; shows a progress bar (clean lines when
        stderr is not a terminal)."""
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            X, Y = data
            _validate.length("Y", Y, X.shape[0], "X")

            def batches():
                n = X.shape[0]
                g = self.generator
                perm = (torch.randperm(n, generator=g, device=g.device if g is not None else "cpu").cpu()
                        if shuffle else torch.arange(n))
                for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                    sel = perm[i:i + batch_size]
                    yield X[sel], Y[sel]
            n_batches = max(X.shape[0] // batch_size, 1)
        else:
            def batches():
                return iter(data)
            n_batches = len(data) if hasattr(data, "__len__") else None
        total = n_batches * epochs if n_batches is not None else None
        bar = progress_bar(total, desc, self.progress)
        history = []
        t0 = time.perf_counter()
        try:
            for epoch in range(epochs):
                for xb, yb in batches():
                    stats = self.step(xb, yb)
                    stats["epoch"] = epoch
                    stats["time_s"] = time.perf_counter() - t0
                    history.append(stats)
                    self.history.append(stats)
                    if callback is not None:
                        callback(stats)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.2f}",
                                    lse_gap=f"{stats['lse_data'] - stats.get('lse_samples', float('nan')):.2f}",
                                    refresh=False)
                    bar.update(1)
        finally:
            bar.close()
        return history
