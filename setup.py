"""Builds visionzip_kernels._C: the op schemas and the C++ CPU kernels, plus the CUDA kernels when
torch is a CUDA build and nvcc is present (TORCH_CUDA_ARCH_LIST honoured, default sm_80;sm_90)."""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # -fopenmp: at::parallel_for is a header-only OpenMP loop; without the flag it runs serially.
    cxx = ["-O3", "-fopenmp", "-DVISIONZIP_PYTHON_MODULE"]
    link = ["-fopenmp"]
    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
    if os.environ.get("VISIONZIP_FORCE_CPU") == "1":
        use_cuda = False
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "visionzip_kernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DVISIONZIP_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
            py_limited_api=True,
        )
    return CppExtension(
        "visionzip_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True
    )


# VISIONZIP_SKIP_EXTENSION=1: the package without compiling, for an editable install next to the
# extension `make build` already built in place against the same torch (`make test-vllm` installs the
# package into its vLLM environment this way instead of compiling it a second time).
SKIP_EXTENSION = os.environ.get("VISIONZIP_SKIP_EXTENSION") == "1"

setup(
    packages=find_packages(include=["visionzip_kernels", "visionzip_kernels.*"]),
    ext_modules=[] if SKIP_EXTENSION else [_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
