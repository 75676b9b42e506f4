"""Small training-loop pieces shared by the helpers that train networks (WideThenNarrow, the
transfer evaluation, the JEM and SEAL trainers, the examples): mini-batches from tensors or an
iterable, an optimizer by name, a progress bar that writes clean lines when the output is not a
terminal, and one epoch loop that reads the loss on the host once per epoch (not once per step)."""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import _validate

OPTIMIZERS = ("adam", "adamw", "sgd")


def check_data(name: str, data):
    """(X, Y) tensors with one label per row, or an iterable of batches (returned as is)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, Y = data
        _validate.tensor(f"{name}[0]", X)
        _validate.length(f"{name}[1]", Y, X.shape[0], f"{name}[0]")
        return X, Y
    if isinstance(data, Tensor) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a tuple (X, Y) of tensors or an iterable of (x, y) batches, "
                        f"got {type(data).__name__}")
    return data


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def batches(data, batch_size: int, *, shuffle: bool = True, generator: Optional[torch.Generator] = None):
    """One epoch of (x, y) batches. Tensors (X, Y) are cut into batch_size rows (the last,
    smaller batch included), shuffled with `generator`; an iterable is iterated as is."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, Y = data
        n = X.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            sel = order[i:i + batch_size].to(X.device)
            yield X[sel], Y[sel]
    else:
        yield from data


def n_batches(data, batch_size: int) -> Optional[int]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return -(-data[0].shape[0] // batch_size)
    return len(data) if hasattr(data, "__len__") else None


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    lr = _validate.number("lr", lr, lo=0.0, lo_open=True)
    weight_decay = _validate.number("weight_decay", weight_decay, lo=0.0)
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class eval_mode:
    """`with eval_mode(model):` the model in eval mode (dropout off, batch-norm statistics frozen),
    its previous mode restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


class _NullBar:
    n = 0

    def __init__(self, iterable=None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def set_description(self, desc, refresh=True):
        pass

    def write(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def close(self):
        pass


class LineBar(_NullBar):
    """Progress for logs: whole lines ("desc: 40/120 (33%), 12.0 s, loss=0.5"), at most one every
    `interval` seconds and one at the end, never a carriage return or an escape code (what tqdm
    writes to a file or a pipe: redrawn bars, nested bars' cursor moves)."""

    def __init__(self, iterable=None, *, total: Optional[int] = None, desc: str = "", file=None,
                 interval: float = 30.0):
        super().__init__(iterable)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.file, self.interval = total, desc, file, interval
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.perf_counter()
        self._closed = False

    def __iter__(self):
        for item in super().__iter__():
            yield item
            self.update(1)
        self.close()

    def _line(self) -> str:
        done = f"{self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%)" if self.total else f"{self.n}"
        text = f"{self.desc}: {done}, {time.perf_counter() - self._start:.1f} s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _emit(self) -> None:
        print(self._line(), file=self.file if self.file is not None else sys.stderr, flush=True)
        self._last = time.perf_counter()

    def update(self, n=1):
        self.n += n
        if time.perf_counter() - self._last >= self.interval:
            self._emit()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = s

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def write(self, line: str) -> None:
        print(line, file=self.file if self.file is not None else sys.stderr, flush=True)

    def close(self):
        if not self._closed:
            self._closed = True
            self._emit()


def progress_bar(total: Optional[int] = None, desc: str = "", enabled: bool = True, *, iterable=None, file=None,
                 interval: float = 30.0):
    """The one progress bar of the package and its examples: a tqdm bar when `file` (stderr) is
    a terminal, clean lines (LineBar) when it is a file or a pipe, nothing when not enabled.
    Iterate it when an iterable is given; otherwise update(n), set_postfix(...), close()."""
    stream = file if file is not None else sys.stderr
    if not enabled:
        return _NullBar(iterable)
    tty = getattr(stream, "isatty", None)
    if tty is None or not tty():
        return LineBar(iterable, total=total, desc=desc, file=stream, interval=interval)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return LineBar(iterable, total=total, desc=desc, file=stream, interval=interval)
    return tqdm(iterable, total=total, desc=desc, leave=False, file=stream, mininterval=0.5, dynamic_ncols=True)


def run_epochs(step_loss: Callable[[Tensor, Tensor], Tensor], optimizer, data, *, epochs: int, batch_size: int,
               generator: Optional[torch.Generator] = None, progress: bool = True, desc: str = "train",
               on_epoch_start: Optional[Callable[[int], None]] = None,
               on_epoch_end: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """epochs x (batches of data: loss = step_loss(x, y); backward; optimizer step). Returns one
    record per epoch: {"epoch", "loss" (mean over the epoch's batches), "time_s"}."""
    history = []
    per_epoch = n_batches(data, batch_size)
    bar = progress_bar(per_epoch * epochs if per_epoch is not None else None, desc, progress)
    t0 = time.perf_counter()
    try:
        for epoch in range(epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            total, count = None, 0
            for xb, yb in batches(data, batch_size, generator=generator):
                loss = step_loss(xb, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total = loss.detach() if total is None else total + loss.detach()
                count += 1
                bar.update(1)
            record = {"epoch": epoch, "loss": float(total) / count if count else float("nan"),
                      "time_s": time.perf_counter() - t0}
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record)
    finally:
        bar.close()
    return history


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in evaluation mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        correct = torch.zeros((), dtype=torch.int64)
        for i in range(0, x.shape[0], batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size].to(x.device)).sum().cpu()
    finally:
        model.train(was_training)
    return correct.item() / max(x.shape[0], 1)
