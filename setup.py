"""Build idl's compiled core: one torch extension, idl._C, from csrc/.

The C kernels (csrc/cpu/*.c) are compiled as C11 with C flags; the C++ glue
(csrc/*.cpp) with torch's C++ flags. When the installed torch has CUDA
(torch.version.cuda) and nvcc is found (CUDA_HOME, or nvcc on PATH), the CUDA
kernels (csrc/cuda/*.cu, with nvcc) and their glue (csrc/cuda/*.cpp) join the
same extension. Environment overrides:

    IDL_CUDA=1       build the CUDA kernels, or fail saying why not
    IDL_CUDA=0       CPU only, even where CUDA is available
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   GPU architectures, as for torch
                     (default here: sm_80 and sm_90, plus compute_90 PTX)
    IDL_DEBUG=1      -O0 -g
    IDL_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer (host code)
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def flag(name):
    return os.environ.get(name, "0").lower() in ON


OPT = ["-O0", "-g"] if flag("IDL_DEBUG") else ["-O3"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if flag("IDL_SANITIZE") else []
# OpenMP parallelises the row passes of the solves; the extension then shares
# the libgomp.so.1 that torch itself loads.
OPENMP = ["-fopenmp"]
# As torch itself is built: no errno from math functions, and no trapping
# floating point, without which GCC keeps the float -> double row passes of the
# projection scalar (and branchy).
FLOAT_MATH = ["-fno-math-errno", "-fno-trapping-math"]
C_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-fPIC", *FLOAT_MATH, *OPENMP, *OPT, *SANITIZE]
CXX_FLAGS = ["-std=c++17", "-Wall", *OPT, *SANITIZE]
# torch adds its own -gencode flags (from TORCH_CUDA_ARCH_LIST, else the local
# GPUs) only when none are given, so these defaults step aside for the variable.
DEFAULT_ARCHS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
ARCHS = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_ARCHS
NVCC_FLAGS = ["-std=c++17", *(["-O0", "-g", "-lineinfo"] if flag("IDL_DEBUG") else ["-O3"]), *ARCHS]


def nvcc_path():
    return os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None


def cuda_unavailable():
    """Why the CUDA kernels cannot be built here, or None if they can."""
    if torch.version.cuda is None:
        return (
            f"the installed torch {torch.__version__} has no CUDA (torch.version.cuda is "
            "None): install a CUDA build of torch"
        )
    if not (nvcc_path() and os.path.exists(nvcc_path())):
        return (
            f"nvcc was not found (CUDA_HOME={CUDA_HOME}): install the CUDA toolkit "
            f"{torch.version.cuda} and set CUDA_HOME or put nvcc on PATH"
        )
    return None


def build_cuda():
    """Whether to build the CUDA kernels: IDL_CUDA=1/0 forces, else when possible."""
    choice = os.environ.get("IDL_CUDA", "").strip().lower()
    if choice in OFF:
        return False
    why_not = cuda_unavailable()
    if choice in ON:
        if why_not:
            sys.exit(f"error: IDL_CUDA={choice} asks for the CUDA kernels, but {why_not}; "
                     "or unset IDL_CUDA to build for CPU only")
        return True
    if choice not in ("", "auto"):
        sys.exit(f"error: IDL_CUDA must be 1 (on), 0 (off) or unset (auto), got {choice!r}")
    return why_not is None


class BuildWithCSources(BuildExtension):
    """torch's BuildExtension compiles every source with the C++ flags (and the
    .cu files with nvcc); this sends the .c files to the compiler with C flags
    instead."""

    def build_extensions(self):
        self._compile_plain = self.compiler._compile
        super().build_extensions()

    def build_extension(self, ext):
        compile_torch = self.compiler._compile

        def compile_one(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
            if src.endswith(".c"):
                return self._compile_plain(obj, src, ext_name, cc_args, C_FLAGS, pp_opts)
            return compile_torch(obj, src, ext_name, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_one
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = compile_torch


def relative(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


SOURCES = relative("csrc/*.cpp") + relative("csrc/cpu/*.c")
# The headers and included bodies: build_ext rebuilds the extension only when a
# source or one of these is newer than it (an edit to idl_math.h alone was
# silently not built).
HEADERS = [path for pattern in ("csrc/*.h", "csrc/cpu/*.h", "csrc/cpu/*.inc", "csrc/cuda/*.h",
                                "csrc/cuda/*.cuh") for path in relative(pattern)]
COMMON = dict(
    name="idl._C", include_dirs=[os.path.join(HERE, "csrc")], depends=HEADERS,
    extra_link_args=[*OPENMP, *SANITIZE],
)

if build_cuda():
    extension = CUDAExtension(
        sources=SOURCES + relative("csrc/cuda/*.cu") + relative("csrc/cuda/*.cpp"),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        **COMMON,
    )
else:
    extension = CppExtension(sources=SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, **COMMON)

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildWithCSources.with_options(use_ninja=False)},
)
