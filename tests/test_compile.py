"""torch.compile of every public loss: fullgraph=True (no graph break) with dynamic=True and with
torch._dynamo.mark_dynamic on the batch dimension, one compilation for every batch size, the
eager values and gradients. The graphs go through AOTAutograd (the custom ops' fake kernels and
autograd formulas) with the aot_eager backend; one case also through Inductor, and CUDA graphs
(mode="reduce-overhead") when a GPU is present."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import structloss_fast as slf
from tests.catalog import CASES

# The adversarial losses run a PGD attack inside (torch.autograd.grad in a loop), which dynamo
# traces only with graph breaks: they are compiled without fullgraph below.
FULLGRAPH = [c for c in CASES if c.name not in ("pgd_adversarial_loss", "trades_loss")]
# Sizes that equal no other dimension of the cases (dynamo's duck sizing would tie them to it and
# recompile when they part) and are not 0 or 1 (specialized).
BATCHES = (11, 13, 17)


def _inputs(case, B, seed):
    inputs, const = case.build(B, torch.float32, torch.Generator().manual_seed(seed))
    return [t.requires_grad_(True) for t in inputs], const


def _value_and_grads(fn, inputs, const):
    out = fn(*inputs, **const)
    w = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad(out, inputs, w, allow_unused=True)
    return out.detach(), grads


def _check(case, compiled, eager, batches, mark, counter=None):
    """Values and gradients against eager for every batch size; the compilations after each."""
    counts = []
    for i, B in enumerate(batches):
        inputs, const = _inputs(case, B, seed=i)
        if mark:
            tensors = inputs + [t for v in const.values() for t in (v if isinstance(v, list) else [v])
                                if torch.is_tensor(t)]
            for t in tensors:
                if t.dim() > 0 and t.shape[0] == B:
                    torch._dynamo.mark_dynamic(t, 0)
        out, grads = _value_and_grads(compiled, inputs, const)
        exp, exp_grads = _value_and_grads(eager, [t.detach().requires_grad_(True) for t in inputs], const)
        torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case.name} B={B}: {m}")
        for g, e in zip(grads, exp_grads):
            if e is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case.name} B={B} grad: {m}")
        counts.append(counter.frame_count if counter is not None else None)
    return counts


# mark_dynamic (dynamic=None) on one case per op and per family of torch-only losses.
MARKED = {"circle_loss", "triplet_margin_loss[batch_hard]", "encouraging_loss", "encouraging_loss[probs]",
          "linear_encouraging_loss", "cosface_loss[fused]", "arcface_loss[dense]", "jem_loss",
          "mahalanobis_loss[per_sample]", "layer_imitation_loss", "sampled_nce_loss", "nce_ranking_loss"}
MODES = [pytest.param(c, mode, id=f"{c.name}-{mode}") for c in FULLGRAPH for mode in ("dynamic", "mark_dynamic")
         if mode == "dynamic" or c.name in MARKED]


@pytest.mark.parametrize("case,mode", MODES)
def test_fullgraph_no_recompilation_per_batch_size(case, mode):
    torch._dynamo.reset()
    reduction = "none" if "none" in case.reductions else case.reductions[0]

    def eager(*inputs, **const):
        return case.call("auto", reduction, *inputs, **const)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(eager, backend=counter, fullgraph=True, dynamic=True if mode == "dynamic" else None)
    counts = _check(case, compiled, eager, BATCHES, mark=mode == "mark_dynamic", counter=counter)
    # The first call compiles once, or twice when dynamo restarts to specialize the Python float
    # parameters it first traced as symbols (its _tensorify_python_scalars pass); later batch
    # sizes compile nothing.
    assert counts[0] in (1, 2) and counts[-1] == counts[0], f"{case.name}: compilations after each batch size {counts}"


@pytest.mark.parametrize("name", ["pgd_adversarial_loss", "trades_loss"])
def test_adversarial_losses_compile_with_graph_breaks(name):
    case = next(c for c in CASES if c.name == name)
    torch._dynamo.reset()

    def eager(*inputs, **const):
        return case.call("auto", "mean", *inputs, **const)

    _check(case, torch.compile(eager, backend="aot_eager", dynamic=True), eager, BATCHES, mark=False)


def test_inductor_dynamic_batch():
    """One loss through Inductor's generated code (CPU): values, gradients, one compilation."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def fn(x, t, W):
        return slf.encouraging_loss(x @ W, t, label_smoothing=0.1)

    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    W = torch.randn(5, 6, requires_grad=True)
    for B in BATCHES:
        gen = torch.Generator().manual_seed(B)
        x = torch.randn(B, 5, generator=gen, requires_grad=True)
        t = torch.randint(0, 6, (B,), generator=gen)
        out = compiled(x, t, W)
        gx, gw = torch.autograd.grad(out, (x, W))
        exp = fn(x, t, W)
        ex, ew = torch.autograd.grad(exp, (x, W))
        torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-5)
    assert counter.frame_count in (1, 2)  # (see test_fullgraph_no_recompilation_per_batch_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["encouraging_loss", "linear_encouraging_loss", "circle_loss", "sampled_nce_loss"])
def test_reduce_overhead_on_gpu(name):
    case = next(c for c in CASES if c.name == name)
    torch._dynamo.reset()
    dev = torch.device("cuda")

    def eager(*inputs, **const):
        return case.call("auto", "mean", *inputs, **const)

    compiled = torch.compile(eager, mode="reduce-overhead", fullgraph=True, dynamic=True)
    for i, B in enumerate(BATCHES):
        inputs, const = case.build(B, torch.float32, torch.Generator().manual_seed(i))
        inputs = [t.to(dev).requires_grad_(True) for t in inputs]
        const = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in const.items()}
        for _ in range(3):  # warm-up, record, replay
            out = compiled(*inputs, **const)
            grads = torch.autograd.grad(out, inputs)
        exp = eager(*inputs, **const)
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
        for g, e in zip(grads, torch.autograd.grad(exp, inputs)):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
