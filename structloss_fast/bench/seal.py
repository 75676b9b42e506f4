"""Benchmark cases of the SEAL family.

- seal/nce_scoring: the fused sample-and-score noise-contrastive loss (forward + backward into the
  unary potentials and the global term's C1, b1, c2) against the composite PyTorch version
  (torch.bernoulli into a B x K x L tensor, dense scoring, autograd). p "uniform" draws
  p ~ U(0, 1) (half of the labels on per sample: the dense worst case of the kernel);
  p "bibtex" draws p = sigmoid(N(-3, 1.5^2)) (about 9% of the labels on, a multi-label
  task-net's outputs: bibtex has 2.4 of 159 labels on).
- seal/train_step: one SEAL-dynamic training step (one NCE loss-net update + one task-net update,
  fused AdamW, bibtex shapes: 1836 features, 159 labels, 400 hidden, batch 32, K = 20) against one
  BCE-only task-net step (reference point), with the fused kernel and with the composite NCE. As
  in train_seal_dynamic, one task-net forward serves the loss-net update (p, detached) and the
  task-net update.
- seal/authors_batch (--full only): one batch of the authors' schedule, 5 x (12 loss-net steps + 1
  task-net step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Case, register


def nce_inputs(size: dict, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, K, L, H = size["B"], size["K"], size["L"], size["H"]
    if size.get("p", "uniform") == "uniform":
        p = torch.rand(B, L, generator=g)
    else:
        p = torch.sigmoid(torch.randn(B, L, generator=g) * 1.5 - 3.0)
    y = (torch.rand(B, L, generator=g) < 0.03).float()
    u = torch.randn(B, L, generator=g)
    W = torch.randn(H, L, generator=g) * (2.0 / L) ** 0.5
    b = torch.zeros(H)
    c = torch.randn(H, generator=g) * (2.0 / H) ** 0.5
    leaves = [t.to(device).requires_grad_(True) for t in (u, W, b, c)]
    return leaves, p.to(device), y.to(device), K


def composite_nce(u, p, y, W, b, c, K):
    """What one writes in PyTorch: sample, stack with the gold labels, score densely."""
    B, L = p.shape
    samples = torch.bernoulli(p.unsqueeze(1).expand(B, K, L))
    ys = torch.cat([y.unsqueeze(1), samples], dim=1)  # (B, K + 1, L)
    logq = -F.binary_cross_entropy(p.unsqueeze(1).expand_as(ys), ys, reduction="none").sum(-1)
    z = (ys * u.unsqueeze(1)).sum(-1) + F.softplus(ys @ W.t() + b) @ c - logq
    return (torch.logsumexp(z, dim=1) - z[:, 0]).sum()


def nce_provider(kind: str):
    def setup(size, device):
        (u, W, b, c), p, y, K = nce_inputs(size, device)

        def run():
            if kind == "fused":
                import structloss_fast as slf

                loss = slf.sampled_nce_loss(u, p, y, W, b, c, num_samples=K)
            else:
                loss = composite_nce(u, p, y, W, b, c, K)
            loss.backward()
            for t in (u, W, b, c):
                t.grad = None

        return run

    return setup


register(Case(
    family="seal",
    name="nce_scoring",
    description="fused NCE sample-and-score (K Bernoulli samples + gold, local + global energy, log q) "
                "vs the composite PyTorch version",
    providers={"structloss_fast": nce_provider("fused"), "composite": nce_provider("composite")},
    sizes=[{"B": 256, "K": 20, "L": 159, "H": 200, "p": "uniform"}],
    full_sizes=[{"B": 1024, "K": 20, "L": 159, "H": 200, "p": "uniform"},
                {"B": 1024, "K": 20, "L": 159, "H": 200, "p": "bibtex"}],
    devices=("cpu",),
))


def train_step_provider(kind: str):
    def setup(size, device):
        import structloss_fast as slf
        from structloss_fast.seal import train as T

        torch.manual_seed(0)
        F_, L, Hd, B, K = size["features"], size["L"], size["hidden"], size["batch"], size["K"]
        task = T.TaskNet(F_, L, hidden=Hd).to(device)
        energy = slf.EnergyNet(F_, L, hidden=Hd, global_hidden=size["H"]).to(device)
        t_opt = T.adamw(task.parameters(), 1e-3, 1e-5)  # fused AdamW, for both steps
        e_opt = T.adamw(energy.parameters(), 1e-3, 1e-5)
        g = torch.Generator().manual_seed(1)
        x = torch.log1p(torch.poisson(torch.full((B, F_), 0.05), generator=g)).to(device)
        y = (torch.rand(B, L, generator=g) < 2.4 / L).float().to(device)

        def bce_step():
            loss = F.binary_cross_entropy_with_logits(task(x), y, reduction="none").sum(1).mean()
            t_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(task.parameters(), 10.0)
            t_opt.step()

        def loss_net_step(composite: bool, p):
            if composite:
                u = energy.unary(x)
                loss = composite_nce(u, p, y, energy.global_linear.weight, energy.global_linear.bias,
                                     energy.global_out, K)
            else:
                loss = slf.nce_ranking_loss(energy, x, p, y, num_samples=K)
            e_opt.zero_grad(set_to_none=True)
            loss.backward()
            e_opt.step()

        def task_step(logits):
            for q in energy.parameters():
                q.requires_grad_(False)
            loss = slf.seal_task_loss(energy, x, logits, y, weight=5.51)
            t_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(task.parameters(), 10.0)
            t_opt.step()
            for q in energy.parameters():
                q.requires_grad_(True)

        if kind == "bce":
            return bce_step

        def seal_step():  # as train_seal_dynamic: one task-net forward serves both updates
            logits = task(x)
            loss_net_step(kind == "composite", torch.sigmoid(logits.detach()))
            task_step(logits)

        def authors_batch():
            for _ in range(5):
                logits = task(x)
                p = torch.sigmoid(logits.detach())
                for _ in range(12):
                    loss_net_step(kind == "authors-composite", p)
                task_step(logits)

        return authors_batch if kind.startswith("authors") else seal_step

    return setup


register(Case(
    family="seal",
    name="train_step",
    description="one SEAL-dynamic step (NCE loss-net update + task-net update, AdamW) vs one BCE-only step, "
                "bibtex shapes",
    providers={
        "structloss_fast": train_step_provider("fused"),
        "composite": train_step_provider("composite"),
        "bce_step": train_step_provider("bce"),
    },
    sizes=[{"batch": 32, "features": 1836, "L": 159, "hidden": 400, "H": 200, "K": 20}],
    full_sizes=[{"batch": 32, "features": 1836, "L": 159, "hidden": 400, "H": 200, "K": 20}],
    reference_points=("bce_step",),
    devices=("cpu",),
))

register(Case(
    family="seal",
    name="authors_batch",
    description="one batch of the authors' SEAL-dynamic bibtex schedule: 5 x (12 NCE loss-net updates + 1 task-net "
                "update) (--full only)",
    providers={
        "structloss_fast": train_step_provider("authors"),
        "composite": train_step_provider("authors-composite"),
        "bce_step": train_step_provider("bce"),
    },
    sizes=[],
    full_sizes=[{"batch": 32, "features": 1836, "L": 159, "hidden": 400, "H": 200, "K": 20}],
    reference_points=("bce_step",),
    devices=("cpu",),
))
