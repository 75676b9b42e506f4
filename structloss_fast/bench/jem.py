"""Benchmark cases of the sgld / jem family: the fused SGLD step against the composite PyTorch
update (the authors' expression and the leanest in-place composite), and a whole 20-step SGLD
chain on the digits CNN with SGLDSampler against the authors' sampling loop, beside the model's
own forward + input-gradient work (the floor: the sampler's overhead is the rest)."""
from __future__ import annotations

import torch

from . import Case, register

STEP, STD = 1.0, 0.01  # the authors' SGLD step and noise


# ---------------------------------------------------------------- one step


def _step_inputs(size, device):
    g = torch.Generator().manual_seed(0)
    shape = (size["B"], 3, 32, 32)
    x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    grad = torch.randn(shape, generator=g).to(device)
    return x, grad


def step_fused(size, device):
    import structloss_fast as slf

    x, grad = _step_inputs(size, device)
    kw = dict(step_size=STEP, noise_std=STD)
    if size.get("variant") == "sada-jem":
        kw.update(grad_clamp=1.0, x_clamp=(-1.0, 1.0))

    def run():
        slf.sgld_step_(x, grad, **kw)

    return run


def step_torch_authors(size, device):
    """The authors' update, x_k.data += a * f_prime + s * randn_like(x_k) (SADA-JEM: the
    clamped form written the same way)."""
    x, grad = _step_inputs(size, device)
    if size.get("variant") == "sada-jem":
        def run():
            x.data = torch.clamp(x + STEP * grad.clamp(-1, 1) + STD * torch.randn_like(x), -1, 1)
    else:
        def run():
            x.data += STEP * grad + STD * torch.randn_like(x)
    return run


def step_torch_inplace(size, device):
    """The leanest composite: in-place adds, one randn_like temporary."""
    x, grad = _step_inputs(size, device)
    if size.get("variant") == "sada-jem":
        def run():
            x.add_(grad.clamp(-1, 1), alpha=STEP).add_(torch.randn_like(x), alpha=STD).clamp_(-1, 1)
    else:
        def run():
            x.add_(grad, alpha=STEP).add_(torch.randn_like(x), alpha=STD)
    return run


STEP_PROVIDERS = {
    "structloss_fast": step_fused,
    "torch_authors": step_torch_authors,
    "torch_inplace": step_torch_inplace,
}

register(Case(
    family="jem",
    name="sgld_step",
    description="one SGLD step (JEM: step 1, noise 0.01, noise drawn inside), x (B, 3, 32, 32) fp32, in place",
    providers=STEP_PROVIDERS,
    sizes=[{"B": 64}],
    full_sizes=[{"B": 64}, {"B": 4096}],
    mode="in-place step",
))

register(Case(
    family="jem",
    name="sgld_step_sada",
    description="one SADA-JEM step (clamp(x + clamp(g, -1, 1) + 0.01 eps, -1, 1)), x (B, 3, 32, 32) fp32",
    providers=STEP_PROVIDERS,
    sizes=[],
    full_sizes=[{"B": 64, "variant": "sada-jem"}, {"B": 4096, "variant": "sada-jem"}],
    mode="in-place step",
))


# ---------------------------------------------------------------- a whole chain


N_STEPS, BUFFER = 20, 10000


def _digits_model(size, device):
    from ..jem.models import SmallCNN

    torch.set_num_threads(size.get("threads", torch.get_num_threads()))
    torch.manual_seed(0)
    return SmallCNN(1, 10, image_size=8, width=size["width"]).to(device)


def chain_sampler(size, device):
    from ..jem import ReplayBuffer, SGLDSampler

    model = _digits_model(size, device)
    buffer = ReplayBuffer(BUFFER, (1, 8, 8), device=device)
    sampler = SGLDSampler(model, buffer, n_steps=N_STEPS, step_size=STEP, noise_std=STD)

    def run():
        return sampler.sample(size["B"])

    return run


def chain_authors(size, device):
    """The authors' sample_q / sample_p_0, transcribed: a CPU-resident buffer, a full batch of
    fresh U(-1, 1) samples mixed in by a 0/1 mask, retain_graph=True, randn_like per step,
    write-back through .cpu()."""
    model = _digits_model(size, device)
    buffer = torch.rand(BUFFER, 1, 8, 8) * 2 - 1

    def run():
        bs = size["B"]
        inds = torch.randint(0, BUFFER, (bs,))
        buffer_samples = buffer[inds]
        random_samples = torch.rand(bs, 1, 8, 8) * 2 - 1
        choose_random = (torch.rand(bs) < 0.05).float()[:, None, None, None]
        init = (choose_random * random_samples + (1 - choose_random) * buffer_samples).to(device)
        model.eval()
        x_k = init.clone().requires_grad_(True)
        for _ in range(N_STEPS):
            f_prime = torch.autograd.grad(model(x_k).logsumexp(1).sum(), [x_k], retain_graph=True)[0]
            x_k.data += STEP * f_prime + STD * torch.randn_like(x_k)
        model.train()
        final = x_k.detach()
        buffer[inds] = final.cpu()
        return final

    return run


def chain_model_floor(size, device):
    """The model's share of a chain alone: 20 x (forward + LSE + gradient wrt x) on a fixed
    batch, no noise, no update, no buffer. Sampler overhead = chain time - this."""
    model = _digits_model(size, device)
    model.eval()
    x0 = (torch.rand(size["B"], 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)

    def run():
        for _ in range(N_STEPS):
            x = x0.detach().requires_grad_(True)
            torch.autograd.grad(model(x).logsumexp(1).sum(), [x])

    return run


def chain_sampler_overhead(size, device):
    """The sampler's own work alone (no model): buffer draw with re-initialisation, 20 fused steps
    through the sampler's pre-validated step function (on a fixed gradient), write-back. The
    sampler's overhead fraction is this time / the structloss_fast chain time."""
    from ..jem import ReplayBuffer, SGLDSampler

    model = _digits_model(size, device)
    buffer = ReplayBuffer(BUFFER, (1, 8, 8), device=device)
    sampler = SGLDSampler(model, buffer, n_steps=N_STEPS, step_size=STEP, noise_std=STD)
    grad = torch.randn(size["B"], 1, 8, 8, generator=torch.Generator().manual_seed(2)).to(device)

    def run():
        x0, idx = buffer.sample(size["B"])
        x = x0.detach().clone().requires_grad_(True)
        step = sampler._step_fn(x)
        for _ in range(N_STEPS):
            step(x.detach(), grad)
        buffer.update(idx, x.detach())

    return run


register(Case(
    family="jem",
    name="sgld_chain",
    description="a 20-step SGLD chain on the digits SmallCNN (batch B, width W), buffer 10000: draw, "
                "20 x (forward + input gradient + step), write-back",
    providers={
        "structloss_fast": chain_sampler,
        "authors_loop": chain_authors,
        "model_floor": chain_model_floor,
        "sampler_overhead": chain_sampler_overhead,
    },
    sizes=[{"B": 64, "width": 16, "threads": 1}],
    full_sizes=[{"B": 64, "width": 16, "threads": 1}, {"B": 64, "width": 32, "threads": 1},
                {"B": 64, "width": 16, "threads": 2}, {"B": 256, "width": 32, "threads": 2}],
    reference_points=("model_floor", "sampler_overhead"),
    mode="sample() call",
))
