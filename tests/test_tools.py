"""The package's tooling: progress bars that write clean lines when the output is not a
terminal (the trainers, the examples), and the benchmark plot (one readable chart per case)."""
from __future__ import annotations

import io
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from structloss_fast import _train
from structloss_fast.bench import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
ESCAPES = re.compile(r"[\r\x1b]")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_writes_clean_lines_to_a_file():
    out = io.StringIO()
    outer = _train.progress_bar(2, "outer", True, file=out, interval=0.0)
    for _ in range(2):
        with _train.progress_bar(desc="inner", iterable=range(3), file=out, interval=0.0) as inner:
            for _ in inner:
                pass
        outer.update(1)
        outer.set_postfix(loss=f"{0.5:.2f}")
    outer.close()
    text = out.getvalue()
    assert not ESCAPES.search(text), repr(text)
    lines = text.splitlines()
    assert "inner: 3/3 (100%)" in lines[3]
    assert lines[-1].startswith("outer: 2/2 (100%)") and lines[-1].endswith("loss=0.50")


def test_progress_bar_is_quiet_between_intervals_and_when_disabled():
    out = io.StringIO()
    bar = _train.progress_bar(100, "steps", True, file=out, interval=3600.0)
    for _ in range(100):
        bar.update(1)
    assert out.getvalue() == ""
    bar.close()
    bar.close()
    assert out.getvalue().count("\n") == 1
    quiet = io.StringIO()
    nothing = _train.progress_bar(10, "x", False, file=quiet)
    nothing.update(3)
    nothing.close()
    assert quiet.getvalue() == "" and list(_train.progress_bar(enabled=False, iterable=[1, 2])) == [1, 2]


def test_progress_bar_on_a_terminal_is_tqdm():
    pytest.importorskip("tqdm")
    bar = _train.progress_bar(3, "tty", True, file=_Tty())
    assert type(bar).__module__.startswith("tqdm")
    bar.close()


def test_trainer_logs_have_no_escape_codes():
    """A trainer run with stderr redirected to a file (a log) writes lines, not redrawn bars."""
    script = (
        "import torch, structloss_fast as slf\n"
        "from structloss_fast._train import run_epochs\n"
        "m = torch.nn.Linear(4, 3)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "X, Y = torch.randn(32, 4), torch.randint(0, 3, (32,))\n"
        "run_epochs(lambda x, y: slf.encouraging_loss(m(x), y), opt, (X, Y), epochs=2, batch_size=8)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: 8/8 (100%)" in proc.stderr and not ESCAPES.search(proc.stderr), repr(proc.stderr)


def _rows():
    rows = []
    for size, times in (("B=10", {"ours": 0.001, "peer": 0.01, "skipped": None}),
                        ("B=1000", {"ours": 1.0, "peer": 3.0, "skipped": None})):
        for prov, t in times.items():
            status = "ok" if t is not None else "skipped: needs a GPU"
            rows.append({"case": "fam/case", "size": size, "provider": prov, "status": status, "time_s": t,
                         "peak_mem_bytes": None if t is None else int(t * 2**30)})
    return rows


def test_plot_groups_scale_each_size_and_leave_out_skipped_providers():
    sizes, providers, bars = runner.plot_groups(_rows(), "time_s")
    assert sizes == ["B=10", "B=1000"]
    assert providers == ["ours", "peer"]  # the skipped provider is in neither the bars nor the legend
    assert bars[("ours", "B=10")] == (0.001, pytest.approx(0.1))
    assert bars[("peer", "B=1000")] == (3.0, 1.0)  # the small size's bars are as tall as the large size's


def test_plot_writes_one_labelled_chart_per_case(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = {}
    original = plt.Figure.savefig

    def capture(fig, path, **kw):
        saved["fig"] = fig
        return original(fig, path, **kw)

    plt.Figure.savefig = capture
    try:
        assert runner.plot(_rows(), {}, str(tmp_path / "r.png"), "machine")
    finally:
        plt.Figure.savefig = original
    axes = saved["fig"].axes
    assert len(axes) == 2  # one case: time and memory
    assert axes[0].get_legend() is None  # one legend per case, beside the memory panel
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["ours", "peer"]
    for ax in axes:
        assert ax.get_yscale() == "linear"
        labels = [t.get_text() for t in ax.texts]
        assert len(labels) == 4 and all(labels)
    assert "1.0 ms" in [t.get_text() for t in axes[0].texts]
    assert (tmp_path / "r.png").stat().st_size > 0


def test_loss_terms_is_exported_and_documented():
    import structloss_fast as slf
    from structloss_fast.pairwise import losses

    assert slf.loss_terms is losses.loss_terms and "loss_terms" in slf.__all__
    assert "structloss_fast.loss_terms" in (ROOT / "docs" / "pairwise.md").read_text()
    terms, stats = slf.loss_terms("circle", (0.4, 80.0), torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert terms.shape == (6, 1) and stats.shape[0] == 6


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bar_has_the_tqdm_methods_the_package_and_examples_call(enabled):
    out = io.StringIO()
    bar = _train.progress_bar(4, "x", enabled, file=out, interval=0.0)
    bar.set_description("y")
    bar.set_postfix(a=1)
    bar.set_postfix_str("epoch 1")
    bar.update(2)
    bar.close()
    assert ("y: 2/4 (50%)" in out.getvalue() and "epoch 1" in out.getvalue()) == enabled
