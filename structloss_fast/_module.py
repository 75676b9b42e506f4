"""The one nn.Module style of every family's losses.

A loss Module is its functional form with the options kept as attributes: `_function` is the
functional loss, `_options` the names of its keyword options (stored as plain attributes,
validated by calling the function); tensors the loss owns are registered by the subclass
(nn.Parameter for learned ones, buffers for fixed ones such as class weights). forward passes
the inputs through unchanged and the options as keywords; extra_repr lists the options.
"""
from __future__ import annotations

from typing import Callable

from torch import nn


class LossModule(nn.Module):
    _function: Callable = None
    _options: tuple[str, ...] = ()

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - set(self._options)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options {sorted(unknown)}")
        for name, value in options.items():
            setattr(self, name, value)

    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._options}

    def forward(self, *inputs):
        return type(self)._function(*inputs, **self.options())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items() if not hasattr(v, "shape"))
