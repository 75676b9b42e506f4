"""Benchmark cases of the adversarial family: one adversarial-training step (attack + loss +
backward + optimizer step) with the package's losses against the papers' composite loops
(Madry et al.'s PGD loop; the TRADES authors' loop, which recomputes the clean forward pass at
every attack step), beside the model's own work (the floor), and an attack over a sweep of
radii in one batched call against one loop per radius."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Case, register

N_ITER = 10


def make_model(size: dict, device) -> nn.Module:
    """"mlp": 64 -> 256 -> 128 -> 10 on digit-sized inputs (1, 8, 8); "cnn": a 4-layer CNN of
    width W on (3, 32, 32) (CIFAR-sized)."""
    torch.manual_seed(0)
    if size["model"] == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                              nn.Linear(128, 10))
    else:
        w = size.get("width", 32)
        model = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10))
    return model.to(device)


def make_batch(size: dict, device):
    g = torch.Generator().manual_seed(1)
    shape = (size["B"], 1, 8, 8) if size["model"] == "mlp" else (size["B"], 3, 32, 32)
    return torch.rand(shape, generator=g).to(device), torch.randint(0, 10, (size["B"],), generator=g).to(device)


def _step_provider(loss_fn):
    """One training step: loss_fn(model, x, y, start, size) -> loss; backward; SGD step."""
    def setup(size, device):
        torch.set_num_threads(size.get("threads", torch.get_num_threads()))
        model = make_model(size, device)
        x, y = make_batch(size, device)
        eps = size["eps"]
        g = torch.Generator(device=device).manual_seed(2)
        start = (x + (torch.rand(x.shape, generator=g, device=device) * 2 - 1) * eps).clamp(0, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run():
            loss = loss_fn(model, x, y, start, size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    return setup


def _pgd_ours(model, x, y, start, size):
    import structloss_fast as slf

    return slf.pgd_adversarial_loss(model, x, y, eps=size["eps"], norm=size.get("norm", "linf"), n_iter=N_ITER,
                                    clamp=(0.0, 1.0), x_init=start)


def _pgd_composite(model, x, y, start, size):
    from ..adversarial import reference as ref

    return ref.pgd_adversarial_loss(model, x, y, norm=size.get("norm", "linf"), eps=size["eps"], n_iter=N_ITER,
                                    clamp=(0.0, 1.0), x_start=start)


def _trades_ours(model, x, y, start, size):
    import structloss_fast as slf

    return slf.trades_loss(model, x, y, eps=size["eps"], norm=size.get("norm", "linf"), n_iter=N_ITER,
                           clamp=(0.0, 1.0), x_init=start)


def _trades_authors(model, x, y, start, size):
    from ..adversarial import reference as ref

    return ref.trades_loss(model, x, y, beta=6.0, norm=size.get("norm", "linf"), eps=size["eps"], n_iter=N_ITER,
                           clamp=(0.0, 1.0), x_start=start)


def _model_floor(model, x, y, start, size):
    """The model's share alone: N_ITER x (forward + input gradient), then the training forward
    (the step's backward and optimizer step follow in the provider). No projection, no sign."""
    model.eval()
    x_adv = start
    for _ in range(N_ITER):
        x_req = x_adv.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), [x_req])
    model.train()
    return F.cross_entropy(model(x_adv), y)


def _standard(model, x, y, start, size):
    """A standard (non-adversarial) training step: the cost adversarial training multiplies."""
    return F.cross_entropy(model(x), y)


STEP_SIZES = [{"model": "mlp", "B": 128, "eps": 0.1, "threads": 1}]
STEP_FULL = [{"model": "mlp", "B": 128, "eps": 0.1, "threads": 1},
             {"model": "mlp", "B": 128, "eps": 0.5, "norm": "l2", "threads": 1},
             {"model": "cnn", "B": 128, "width": 32, "eps": 0.031, "threads": 1},
             {"model": "cnn", "B": 128, "width": 32, "eps": 0.031, "threads": 2}]

register(Case(
    family="adversarial",
    name="pgd_training_step",
    description=f"one PGD-{N_ITER} adversarial-training step (L-inf unless said; attack + CE + backward + SGD)",
    providers={
        "structloss_fast": _step_provider(_pgd_ours),
        "madry_loop": _step_provider(_pgd_composite),
        "model_floor": _step_provider(_model_floor),
        "standard_step": _step_provider(_standard),
    },
    sizes=STEP_SIZES,
    full_sizes=STEP_FULL,
    reference_points=("model_floor", "standard_step"),
    mode="training step",
))

register(Case(
    family="adversarial",
    name="trades_training_step",
    description=f"one TRADES step (beta 6, PGD-{N_ITER} on the KL; attack + loss + backward + SGD)",
    providers={
        "structloss_fast": _step_provider(_trades_ours),
        "authors_loop": _step_provider(_trades_authors),
    },
    sizes=STEP_SIZES,
    full_sizes=STEP_FULL,
    mode="training step",
))


# ---------------------------------------------------------------- an epsilon sweep


def _sweep_provider(batched: bool):
    def setup(size, device):
        import structloss_fast as slf

        torch.set_num_threads(size.get("threads", torch.get_num_threads()))
        model = make_model(size, device)
        x, y = make_batch(size, device)
        radii = [size["eps"] * k for k in range(1, size["E"] + 1)]
        norm = size.get("norm", "linf")

        if batched:
            def run():
                return slf.pgd_attack(model, x, y, norm=norm, eps=radii, n_iter=N_ITER, clamp=(0.0, 1.0),
                                      random_start=False)
        else:
            def run():
                return [slf.pgd_attack(model, x, y, norm=norm, eps=r, n_iter=N_ITER, clamp=(0.0, 1.0),
                                       random_start=False) for r in radii]
        return run

    return setup


register(Case(
    family="adversarial",
    name="pgd_eps_sweep",
    description=f"PGD-{N_ITER} at E radii (eps, 2 eps, ..., E eps): one batched attack vs one attack per radius",
    providers={
        "structloss_fast": _sweep_provider(True),
        "one_attack_per_radius": _sweep_provider(False),
    },
    sizes=[{"model": "mlp", "B": 128, "eps": 0.05, "E": 4, "threads": 1}],
    full_sizes=[{"model": "mlp", "B": 128, "eps": 0.05, "E": 4, "threads": 1},
                {"model": "mlp", "B": 32, "eps": 0.05, "E": 8, "threads": 1},
                {"model": "cnn", "B": 128, "width": 32, "eps": 0.008, "E": 4, "threads": 1}],
    mode="attack",
))
