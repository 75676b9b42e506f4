"""Transfer of a source model to a target task (docs/spec/adversarial.md), as Salman et al.
evaluate robust and standard ImageNet models: replace the last linear layer by a new one for the
target classes and train either that layer alone on the frozen features (fixed-feature) or the
whole network (full-network); report the target test accuracy."""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _train

__all__ = ["TRANSFER_MODES", "TransferResult", "transfer", "find_head"]

TRANSFER_MODES = ("fixed-feature", "full-network")


@dataclasses.dataclass
class TransferResult:
    mode: str
    accuracy: float           # on the target test set
    model: nn.Module          # the source network with the new head (trained as the mode says)
    history: list             # per-epoch records of the target training


def find_head(model: nn.Module, head: Optional[str] = None) -> tuple[str, nn.Linear]:
    """(name, module) of the head to replace: `head` (a submodule name such as "fc" or "3"), or
    the last nn.Linear in model.named_modules() order."""
    if head is not None:
        try:
            layer = model.get_submodule(head)
        except AttributeError as exc:
            raise ValueError(f"head {head!r} is not a submodule of the source model") from exc
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"head {head!r} must be an nn.Linear, got {type(layer).__name__}")
        return head, layer
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the source model has no nn.Linear to replace (pass head=...)")
    return linears[-1]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def _features(extractor: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    if x.shape[0] == 0:
        return extractor(x)
    return torch.cat([extractor(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def transfer(source: nn.Module, train_data, test_data, *, n_classes: int, modes: Sequence[str] = TRANSFER_MODES,
             head: Optional[str] = None, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3,
             optimizer: str = "adam", weight_decay: float = 0.0, generator: Optional[torch.Generator] = None,
             progress: bool = True) -> dict[str, TransferResult]:
    """Evaluate `source` on a target task in each of `modes`.

    Args:
        source: the trained source network (not modified: each mode works on a copy).
        train_data, test_data: the target task, tuples (X, Y) of tensors.
        n_classes: the number of target classes (the new head's outputs).
        modes: "fixed-feature" (the features are computed once, in evaluation mode, and only
            the new head is trained on them) and/or "full-network" (every parameter trained,
            the network in training mode).
        head: the name of the layer to replace (default: the last nn.Linear).
        epochs, batch_size, lr, optimizer ("adam" | "adamw" | "sgd"), weight_decay, generator
            (shuffling), progress: the target training, the same for both modes.

    Returns {mode: TransferResult(mode, accuracy, model, history)}. The new head is initialised
    from the global RNG (seed it for reproducible runs).
    """
    X, Y = _train.check_data("train_data", train_data)
    Xt, Yt = _train.check_data("test_data", test_data)
    _train.positive_int("n_classes", n_classes)
    _train.non_negative_int("epochs", epochs)
    _train.positive_int("batch_size", batch_size)
    if isinstance(modes, str):
        modes = (modes,)
    for mode in modes:
        if mode not in TRANSFER_MODES:
            raise ValueError(f"modes must be taken from {TRANSFER_MODES}, got {mode!r}")
    name, old_head = find_head(source, head)
    like = old_head.weight
    results = {}
    for mode in modes:
        model = copy.deepcopy(source)
        new_head = nn.Linear(old_head.in_features, n_classes, bias=old_head.bias is not None).to(like)
        if mode == "fixed-feature":
            _replace(model, name, nn.Identity())
            model.eval()
            f_train, f_test = _features(model, X), _features(model, Xt)
            opt = _train.make_optimizer(new_head.parameters(), optimizer, lr, weight_decay)
            history = _train.run_epochs(lambda f, y: F.cross_entropy(new_head(f), y), opt, (f_train, Y),
                                        epochs=epochs, batch_size=batch_size, generator=generator, progress=progress,
                                        desc="fixed-feature")
            acc = _train.accuracy(new_head, f_test, Yt)
            for p in model.parameters():
                p.requires_grad_(False)
            _replace(model, name, new_head)
        else:
            _replace(model, name, new_head)
            model.train()
            opt = _train.make_optimizer(model.parameters(), optimizer, lr, weight_decay)
            history = _train.run_epochs(lambda x, y: F.cross_entropy(model(x), y), opt, (X, Y), epochs=epochs,
                                        batch_size=batch_size, generator=generator, progress=progress,
                                        desc="full-network")
            acc = _train.accuracy(model, Xt, Yt)
        results[mode] = TransferResult(mode, acc, model, history)
    return results
