"""Build of structloss_fast's compiled ops (torch.utils.cpp_extension + ninja).

The CPU sources are always built. The CUDA sources are built when a CUDA toolkit (CUDA_HOME)
and a CUDA build of torch (torch.version.cuda) are both present: this is decided from the
build environment, never from torch.cuda.is_available(), so a build machine without a GPU
still builds the CUDA kernels. Overrides: FORCE_CUDA=1 (fail if CUDA cannot be built),
FORCE_ONLY_CPU=1 (skip CUDA).

Install with `pip install --no-build-isolation -e .`: the extension must be compiled against
the torch that is installed in the environment (its headers and ABI), which an isolated build
environment would replace with whatever torch pip downloads.
"""
import glob
import os
import sys
import sysconfig

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if _flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU=1"
    has_torch_cuda = torch.version.cuda is not None
    has_toolkit = CUDA_HOME is not None
    if _flag("FORCE_CUDA"):
        if not (has_torch_cuda and has_toolkit):
            sys.exit(
                "FORCE_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True, "FORCE_CUDA=1"
    if not has_torch_cuda:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not has_toolkit:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA toolkit at {CUDA_HOME}, torch CUDA {torch.version.cuda}"


def nvidia_wheel_includes():
    """Headers that CUDA builds of torch take from the nvidia-* wheels (cusparse.h, cublas, curand)."""
    dirs = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def extensions():
    use_cuda, why = want_cuda()
    print(f"structloss_fast: building {'CPU + CUDA' if use_cuda else 'CPU only'} ({why})")
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + rel("csrc/common/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    # -fopenmp compiles at::parallel_for's OpenMP regions and `omp simd` loops; libgomp itself
    # is not linked here, its symbols resolve to the OpenMP runtime that libtorch loads.
    kwargs = dict(extra_compile_args={"cxx": cxx}, include_dirs=[os.path.join(ROOT, "csrc")])
    if use_cuda:
        sources += rel("csrc/cuda/*.cu")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] += nvidia_wheel_includes()
        kwargs["define_macros"] = [("SLF_WITH_CUDA", "1")]
        return [CUDAExtension("structloss_fast._C", sources, **kwargs)]
    return [CppExtension("structloss_fast._C", sources, **kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
