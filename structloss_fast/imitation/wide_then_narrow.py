"""Go Wide, Then Narrow (docs/spec/imitation.md): adapters between the blocks of a thin network so
that every prefix of it can imitate the same prefix of a wide network, and the three stages
(train the wide network, layer-wise imitation, merge the adapters and fine-tune the thin one)."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _train, _validate
from .losses import check_reductions, check_weights, layer_imitation_loss

__all__ = ["FeatureLinear", "WideThenNarrow", "SCHEDULES"]

SCHEDULES = ("joint", "progressive")


class FeatureLinear(nn.Module):
    """A linear map without bias on one feature axis of its input: nn.Linear's product on (N, C)
    or (N, T, C) (feature_dim=-1), a 1x1 convolution on (N, C, H, W) (feature_dim=1)."""

    def __init__(self, in_features: int, out_features: int, *, feature_dim: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.feature_dim = in_features, out_features, feature_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        d = self.feature_dim % x.dim()
        if d == x.dim() - 1:
            return F.linear(x, self.weight)
        return F.linear(x.movedim(d, -1), self.weight).movedim(-1, d)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, feature_dim={self.feature_dim}"


def _first_layer(block: nn.Module) -> Optional[nn.Module]:
    """The linear layer or convolution that block's input meets first, if that is evident."""
    m = block
    while isinstance(m, nn.Sequential) and len(m) > 0:
        m = m[0]
    if isinstance(m, nn.Linear) or (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1):
        return m
    return None


def _check_sequential(name: str, net) -> nn.Sequential:
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"{name} must be an nn.Sequential of blocks, got {type(net).__name__}")
    if len(net) < 1:
        raise ValueError(f"{name} must have at least one block")
    return net


@torch.no_grad()
def _block_shapes(net: nn.Sequential, x: Tensor) -> list[torch.Size]:
    was_training = net.training
    net.eval()
    shapes = []
    try:
        for block in net:
            x = block(x)
            if not isinstance(x, Tensor):
                raise TypeError(f"every block must return one tensor, block {len(shapes)} returned {type(x).__name__}")
            shapes.append(x.shape)
    finally:
        net.train(was_training)
    return shapes


class WideThenNarrow(nn.Module):
    """Go Wide, Then Narrow for a wide and a thin nn.Sequential of the same depth.

    Args:
        wide, thin: nn.Sequential of n blocks each (block i of one corresponds to block i of the
            other). The first blocks take the same input; the last blocks produce outputs of the
            same shape (e.g. the logits).
        example_input: a small batch of inputs, run once through both networks to read the
            feature sizes between the blocks.
        feature_dim: the feature axis of the intermediate outputs (1: (N, C), (N, C, H, W);
            -1: (N, T, C)); the other axes must agree between the networks.
        layer_weights: w_i of the imitation loss (default 1 each), n numbers.
        reduction: the imitation loss's per-layer reduction ("mean", "sum", "batchmean", or one
            per layer).
        task_loss: the loss of stages 1 and 3, task_loss(logits, y) (default cross-entropy).
        backend: the imitation loss's backend.

    Between blocks i and i+1 whose feature sizes differ, a widening map M_{i,1} (thin -> wide)
    and a narrowing map M_{i,2} (wide -> thin) are inserted (FeatureLinear, no bias;
    M_{i,1} has orthonormal columns and M_{i,2} = M_{i,1}^T at the start, so that the adapted
    thin network initially computes what the thin network computes). Where the sizes agree, the
    maps are identities.
    """

    def __init__(self, wide: nn.Sequential, thin: nn.Sequential, example_input: Tensor, *, feature_dim: int = 1,
                 layer_weights: Optional[Sequence[float]] = None, reduction="mean",
                 task_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, backend: str = "auto"):
        super().__init__()
        self.wide = _check_sequential("wide", wide)
        self.thin = _check_sequential("thin", thin)
        if len(wide) != len(thin):
            raise ValueError(f"wide and thin must have the same number of blocks, got {len(wide)} and {len(thin)}")
        _validate.tensor("example_input", example_input)
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
            raise TypeError(f"feature_dim must be an int, got {type(feature_dim).__name__}")
        n = len(thin)
        self.layer_weights = check_weights(layer_weights, n)
        self.reduction = check_reductions(reduction, n)
        self.feature_dim, self.task_loss, self.backend = feature_dim, task_loss, backend
        wide_shapes = _block_shapes(wide, example_input)
        thin_shapes = _block_shapes(thin, example_input)
        self.widen, self.narrow = nn.ModuleList(), nn.ModuleList()
        self._feature_axes = []  # (rank, feature axis) of the output of each block but the last
        for i, (ws, ts) in enumerate(zip(wide_shapes, thin_shapes)):
            if i == n - 1:
                if ws != ts:
                    raise ValueError(f"the last blocks must produce outputs of the same shape, got wide {tuple(ws)} "
                                     f"and thin {tuple(ts)}")
                break
            if len(ws) != len(ts) or len(ws) < 1 or not -len(ws) <= feature_dim < len(ws):
                raise ValueError(f"block {i}: outputs of shapes {tuple(ws)} (wide) and {tuple(ts)} (thin) have no "
                                 f"common feature axis {feature_dim}")
            d = feature_dim % len(ws)
            self._feature_axes.append((len(ws), d))
            if [s for k, s in enumerate(ws) if k != d] != [s for k, s in enumerate(ts) if k != d]:
                raise ValueError(f"block {i}: outputs of shapes {tuple(ws)} (wide) and {tuple(ts)} (thin) may differ "
                                 f"only along feature_dim={feature_dim}")
            if ws[d] == ts[d]:
                self.widen.append(nn.Identity())
                self.narrow.append(nn.Identity())
            else:
                widen = FeatureLinear(ts[d], ws[d], feature_dim=feature_dim)
                narrow = FeatureLinear(ws[d], ts[d], feature_dim=feature_dim)
                with torch.no_grad():
                    narrow.weight.copy_(widen.weight.t())
                self.widen.append(widen)
                self.narrow.append(narrow)
        like = next(iter(thin.parameters()), example_input)  # the adapters take the thin network's device and dtype
        self.widen.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
        self.narrow.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
        self.merged = False
        self.history: dict[str, list[dict]] = {"wide": [], "imitation": [], "fine_tune": []}

    # ------------------------------------------------------------ the two chains

    def student_outputs(self, x: Tensor, upto: Optional[int] = None) -> list[Tensor]:
        """a_1..a_k: the outputs of the adapted thin network's prefixes P_1..P_k (k = upto or n),
        each in the wide network's feature space."""
        if self.merged:
            raise RuntimeError("the adapters were merged into the thin network (narrow()); imitation is over")
        k = len(self.thin) if upto is None else upto
        outs, h = [], x
        for i in range(k):
            a = self.thin[i](h)
            if i < len(self.thin) - 1:
                a = self.widen[i](a)
                h = self.narrow[i](a)
            outs.append(a)
        return outs

    @torch.no_grad()
    def teacher_outputs(self, x: Tensor, upto: Optional[int] = None) -> list[Tensor]:
        """b_1..b_k: the wide network's block outputs (evaluation mode, no gradient)."""
        k = len(self.wide) if upto is None else upto
        was_training = self.wide.training
        self.wide.eval()
        outs, h = [], x
        try:
            for i in range(k):
                h = self.wide[i](h)
                outs.append(h)
        finally:
            self.wide.train(was_training)
        return outs

    def imitation_loss(self, x: Tensor, *, upto: Optional[int] = None, per_layer: bool = False) -> Tensor:
        """The layer-wise imitation loss of the prefixes 1..upto (all by default) on inputs x."""
        k = len(self.thin) if upto is None else upto
        return layer_imitation_loss(self.student_outputs(x, k), self.teacher_outputs(x, k),
                                    weights=self.layer_weights[:k], reduction=self.reduction[:k],
                                    per_layer=per_layer, backend=self.backend)

    def balance_weights(self, x: Tensor) -> list[float]:
        """Set the layer weights to w_i = 1 / mean(b_i^2) over the inputs x (the wide network's
        output power per layer), so that every prefix's term starts on the same scale: without
        normalisation layers the activations of a deep network can grow by orders of magnitude
        from block to block, and the deepest terms would drown the others. Reads the powers back
        to the host once. Returns the weights."""
        powers = torch.stack([b.double().pow(2).mean() for b in self.teacher_outputs(x)]).cpu()
        self.layer_weights = [1.0 / max(p, 1e-12) for p in powers.tolist()]
        return self.layer_weights

    def forward(self, x: Tensor) -> Tensor:
        """The thin network's output (through the adapters until they are merged)."""
        if self.merged:
            return self.thin(x)
        return self.student_outputs(x)[-1]

    # ------------------------------------------------------------ the three stages

    def fit_wide(self, data, *, epochs: int, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, generator: Optional[torch.Generator] = None, progress: bool = True,
                 callback: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Stage 1: train the wide network on the task (task_loss on labeled data). callback(record)
        is called after every epoch (record: epoch, mean loss, time)."""
        data = _train.check_data("data", data)
        _train.non_negative_int("epochs", epochs)
        _train.positive_int("batch_size", batch_size)
        opt = _train.make_optimizer(self.wide.parameters(), optimizer, lr, weight_decay)
        self.wide.train()
        hist = _train.run_epochs(lambda x, y: self.task_loss(self.wide(x), y), opt, data, epochs=epochs,
                                 batch_size=batch_size, generator=generator, progress=progress, desc="go wide",
                                 on_epoch_end=callback)
        self.history["wide"] += hist
        return hist

    def imitation_parameters(self) -> list[nn.Parameter]:
        return list(self.thin.parameters()) + list(self.widen.parameters()) + list(self.narrow.parameters())

    def imitate(self, data, *, epochs: int, schedule: str = "joint", batch_size: int = 64, lr: float = 1e-3,
                optimizer: str = "adam", weight_decay: float = 0.0, generator: Optional[torch.Generator] = None,
                progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Stage 2: train the thin blocks and the adapters so that every prefix imitates the
        wide network (labels are not used). schedule "joint": all prefixes in every step;
        "progressive": the epochs split into n phases, phase k trains prefixes 1..k (bottom to
        top; deeper blocks are not run)."""
        if self.merged:
            raise RuntimeError("the adapters were merged into the thin network (narrow()); imitation is over")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        data = _train.check_data("data", data)
        _train.non_negative_int("epochs", epochs)
        _train.positive_int("batch_size", batch_size)
        n = len(self.thin)
        opt = _train.make_optimizer(self.imitation_parameters(), optimizer, lr, weight_decay)
        upto = [n]

        def set_phase(epoch):
            if schedule == "progressive":
                upto[0] = min(n, 1 + (epoch * n) // max(epochs, 1))

        def on_end(record):
            record["layers"] = upto[0]
            if callback is not None:
                callback(record)

        self.thin.train()
        hist = _train.run_epochs(lambda x, y: self.imitation_loss(x, upto=upto[0]), opt, data, epochs=epochs,
                                 batch_size=batch_size, generator=generator, progress=progress, desc="imitate",
                                 on_epoch_start=set_phase, on_epoch_end=on_end)
        self.history["imitation"] += hist
        return hist

    @torch.no_grad()
    def narrow_(self) -> nn.Sequential:
        """Merge each product M_{i,2} M_{i,1} into the first linear layer or convolution of block
        i+1 of the thin network (exact); where a block does not begin with one, the product is
        kept as a FeatureLinear in front of it (with a warning). Returns the thin network
        (modified in place); afterwards this object's forward is the thin network's."""
        if self.merged:
            return self.thin
        for i, (widen, narrow) in enumerate(zip(self.widen, self.narrow)):
            if isinstance(widen, nn.Identity):
                continue
            product = narrow.weight @ widen.weight  # (d_S, d_S): h_i = product @ s_i
            nxt = self.thin[i + 1]
            layer = _first_layer(nxt)
            rank, d = self._feature_axes[i]
            if isinstance(layer, nn.Linear) and d == rank - 1:
                layer.weight.copy_(layer.weight @ product)
            elif layer is not None and not isinstance(layer, nn.Linear) and d == 1 and layer.weight.dim() == rank:
                # a convolution: contract its input channels with the product
                layer.weight.copy_(torch.einsum("oc...,cd->od...", layer.weight, product))
            else:
                bridge = FeatureLinear(product.shape[1], product.shape[0], feature_dim=self.feature_dim).to(product)
                bridge.weight.copy_(product)
                self.thin[i + 1] = nn.Sequential(bridge, nxt)
                warnings.warn(f"WideThenNarrow: block {i + 1} of the thin network does not begin with a linear layer "
                              f"or convolution on feature_dim={self.feature_dim}; the adapters' product is kept in "
                              f"front of it as a {product.shape[0]}x{product.shape[1]} FeatureLinear", stacklevel=2)
        self.widen = nn.ModuleList(nn.Identity() for _ in self.widen)
        self.narrow = nn.ModuleList(nn.Identity() for _ in self.narrow)
        self.merged = True
        return self.thin

    def fine_tune(self, data, *, epochs: int, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                  weight_decay: float = 0.0, generator: Optional[torch.Generator] = None, progress: bool = True,
                  callback: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Stage 3: merge the adapters (narrow_()) and train the thin network alone on the task."""
        data = _train.check_data("data", data)
        _train.non_negative_int("epochs", epochs)
        _train.positive_int("batch_size", batch_size)
        thin = self.narrow_()
        opt = _train.make_optimizer(thin.parameters(), optimizer, lr, weight_decay)
        thin.train()
        hist = _train.run_epochs(lambda x, y: self.task_loss(thin(x), y), opt, data, epochs=epochs,
                                 batch_size=batch_size, generator=generator, progress=progress, desc="fine-tune",
                                 on_epoch_end=callback)
        self.history["fine_tune"] += hist
        return hist

    def fit(self, data, *, wide_epochs: int, imitation_epochs: int, fine_tune_epochs: int,
            imitation_data=None, schedule: str = "joint", **train_kwargs) -> nn.Sequential:
        """The three stages in order (imitation on `imitation_data` when given, e.g. unlabeled
        inputs with dummy labels; else on `data`). train_kwargs (batch_size, lr, optimizer,
        weight_decay, generator, progress) apply to every stage. Returns the thin network."""
        self.fit_wide(data, epochs=wide_epochs, **train_kwargs)
        self.imitate(data if imitation_data is None else imitation_data, epochs=imitation_epochs, schedule=schedule,
                     **train_kwargs)
        self.fine_tune(data, epochs=fine_tune_epochs, **train_kwargs)
        return self.thin

    def extra_repr(self):
        sizes = [(w.in_features, w.out_features) if isinstance(w, FeatureLinear) else None for w in self.widen]
        return f"adapters (thin -> wide) between blocks: {sizes}, merged={self.merged}"
