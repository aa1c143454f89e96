"""Build script: the optional compiled extension ``fusionblocks._C`` (sources in csrc/).

* C++ CPU kernels are built whenever torch and a C++ compiler are present.
* CUDA kernels are added when ``FUSIONBLOCKS_CUDA=1``, or automatically when torch is a CUDA build and
  ``nvcc`` is found (``FUSIONBLOCKS_CUDA=0`` turns that off).
* ``FUSIONBLOCKS_NO_EXT=1`` skips the extension altogether.

A failed build of the extension only warns: the package still installs and ``fusionblocks.ops``
falls back to the other backends (``fusionblocks.ops.explain`` says why ``cpp`` cannot run).
Build in place with ``python setup.py build_ext --inplace`` or ``pip install --no-build-isolation -e .``
(the extension needs the installed torch, so build isolation, which hides it, skips the extension).
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() not in ("", "0", "false", "no", "off")


def _warn(msg, consequence="the compiled backends (cpp/cuda) will be unavailable"):
    warnings.warn(f"fusionblocks: {msg}; {consequence}", stacklevel=1)
    print(f"WARNING fusionblocks: {msg}; {consequence}", file=sys.stderr)


def _extensions():
    if _flag("FUSIONBLOCKS_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as cx
    except Exception as e:  # torch missing (e.g. an isolated build environment)
        _warn(f"torch is not importable at build time ({type(e).__name__}: {e}), skipping fusionblocks._C")
        return [], {}

    def rel(pattern):
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    sources = rel("csrc/fusionblocks.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
    link = ["-fopenmp"]
    want_cuda = _flag("FUSIONBLOCKS_CUDA")
    nvcc = shutil.which("nvcc") or (cx.CUDA_HOME and os.path.join(cx.CUDA_HOME, "bin", "nvcc"))
    has_nvcc = bool(nvcc) and os.path.exists(nvcc)
    if want_cuda is None:
        want_cuda = torch.version.cuda is not None and has_nvcc
    if want_cuda and torch.version.cuda is None:
        _warn("FUSIONBLOCKS_CUDA=1 but torch is a CPU build", "building the CPU kernels only")
        want_cuda = False
    if want_cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        ext = cx.CUDAExtension(
            "fusionblocks._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFUSIONBLOCKS_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = cx.CppExtension("fusionblocks._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class OptionalBuildExt(cx.BuildExtension):
        """``BuildExtension`` whose failures warn instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure must leave a usable package
                _warn(f"building fusionblocks._C failed ({type(e).__name__}: {e})")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                _warn(f"building {ext.name} failed ({type(e).__name__}: {e})")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=cx.is_ninja_available())}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
