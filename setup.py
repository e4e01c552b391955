"""Build idl's compiled core: one torch extension, idl._C, from csrc/.

The C kernels (csrc/cpu/*.c) are compiled as C11 with C flags; the C++ glue
(csrc/ops.cpp) with torch's C++ flags. Environment overrides:

    IDL_DEBUG=1      -O0 -g
    IDL_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


OPT = ["-O0", "-g"] if flag("IDL_DEBUG") else ["-O3"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if flag("IDL_SANITIZE") else []
# OpenMP parallelises the row passes of the solves; the extension then shares
# the libgomp.so.1 that torch itself loads.
OPENMP = ["-fopenmp"]
C_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-fPIC", *OPENMP, *OPT, *SANITIZE]
CXX_FLAGS = ["-std=c++17", "-Wall", *OPT, *SANITIZE]


class BuildWithCSources(BuildExtension):
    """torch's BuildExtension compiles every source with the C++ flags; this
    sends the .c files to the compiler with C flags instead."""

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


extension = CppExtension(
    name="idl._C",
    sources=relative("csrc/*.cpp") + relative("csrc/cpu/*.c"),
    include_dirs=[os.path.join(HERE, "csrc")],
    extra_compile_args={"cxx": CXX_FLAGS},
    extra_link_args=[*OPENMP, *SANITIZE],
)

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildWithCSources.with_options(use_ninja=False)},
)
