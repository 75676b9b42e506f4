"""Benchmark cases of the imitation family: the layer-imitation loss over L layers (forward +
backward wrt the thin network's adapted outputs, the wide network's outputs fixed) against the
composite PyTorch sum of F.mse_loss per layer and the dense reference. Sizes name their thread
count: on a 2-core machine shared with other jobs, 2-thread times are dominated by the thread
pool waiting for a descheduled thread (milliseconds), so the 1-thread sizes are the comparison."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Case, register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_layers(size: dict, device):
    """L pairs of (B, D) activations: the student's require grad, the teacher's do not."""
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[size.get("dtype", "float32")]
    shape = (size["B"], size["D"])
    student = [torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
               for _ in range(size["L"])]
    teacher = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(size["L"])]
    return student, teacher


def _provider(loss_fn):
    def setup(size, device):
        torch.set_num_threads(size.get("threads", torch.get_num_threads()))
        student, teacher = make_layers(size, device)
        weights = [1.0 + 0.1 * i for i in range(size["L"])]

        def run():
            loss_fn(student, teacher, weights).backward()
            for s in student:
                s.grad = None

        return run

    return setup


def _ours(student, teacher, weights):
    import structloss_fast as slf

    return slf.layer_imitation_loss(student, teacher, weights=weights)


def _composite(student, teacher, weights):
    """What one writes in PyTorch: a weighted sum of F.mse_loss, one per layer."""
    return sum(w * F.mse_loss(s, t) for s, t, w in zip(student, teacher, weights))


def _reference(student, teacher, weights):
    from ..imitation import reference as ref

    return ref.layer_imitation_loss(student, teacher, weights, ["mean"] * len(student))


register(Case(
    family="imitation",
    name="layer_imitation_loss",
    description="sum_i w_i MSE(a_i, b_i) over L layers of (B, D) fp32 activations, forward + backward wrt a_i",
    providers={
        "structloss_fast": _provider(_ours),
        "torch_mse_sum": _provider(_composite),
        "dense_reference": _provider(_reference),
    },
    sizes=[{"L": 8, "B": 64, "D": 64, "threads": 1}, {"L": 8, "B": 256, "D": 512, "threads": 1}],
    full_sizes=[{"L": 8, "B": 64, "D": 64, "threads": 1}, {"L": 8, "B": 256, "D": 512, "threads": 1},
                {"L": 12, "B": 4096, "D": 768, "threads": 1}, {"L": 4, "B": 64, "D": 200704, "threads": 1},
                {"L": 8, "B": 256, "D": 512, "threads": 2}, {"L": 12, "B": 4096, "D": 768, "threads": 2}],
))

register(Case(
    family="imitation",
    name="layer_imitation_loss_bf16",
    description="the same in bfloat16 (accumulated in float64 by the kernel, in float32 by PyTorch's mean)",
    providers={
        "structloss_fast": _provider(_ours),
        "torch_mse_sum": _provider(_composite),
    },
    sizes=[],
    full_sizes=[{"L": 12, "B": 4096, "D": 768, "dtype": "bfloat16", "threads": 1}],
))
