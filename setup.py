"""Build script: the optional compiled extension ``fusionblocks._C`` (sources in csrc/).

When the kernels are built:

* C++ CPU kernels: whenever torch and a C++ compiler are present (``FUSIONBLOCKS_NO_EXT=1`` skips the extension).
* CUDA kernels are added when ``FUSIONBLOCKS_CUDA=1``, or automatically when torch is a CUDA build and ``nvcc``
  is found (``FUSIONBLOCKS_CUDA=0`` turns that off) -- provided the CUDA architectures can be chosen: a visible
  GPU, or ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``) on a machine without one.
* A CUDA build that cannot be configured or fails falls back to the CPU-only extension; a CPU build that fails
  leaves no extension. Either way the package installs and says why: on stderr at build time (hidden by
  ``pip -q`` when the build succeeds) and at run time, from ``fusionblocks/_C_build.json`` written next to the
  extension (``fusionblocks info`` and ``fusionblocks.ops.explain`` report it as the reason ``cuda`` cannot run).

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


NOTE_FILE = "_C_build.json"


def _warn(msg, consequence="the compiled backends (cpp/cuda) will be unavailable"):
    warnings.warn(f"fusionblocks: {msg}; {consequence}", stacklevel=1)
    print(f"WARNING fusionblocks: {msg}; {consequence}", file=sys.stderr, flush=True)


def _cuda_unconfigurable(torch):
    """Why torch cannot choose the CUDA architectures to compile for here, or ``None``."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return None
    try:
        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
        gpus = 0
    if gpus == 0:
        return "no GPU is visible to choose the CUDA architectures from and TORCH_CUDA_ARCH_LIST is not set"
    return None


def _toolkit_root(cx, nvcc):
    """The CUDA toolkit's root for ``nvcc``, with ``include/cuda_runtime.h`` under it, or ``None``.

    torch guesses the root as the folder above ``nvcc``'s ``bin``; for a wrapper script (e.g.
    ``/usr/local/bin/nvcc`` calling ``/usr/local/cuda-13.0/bin/nvcc``) that guess has no headers, so
    nvcc itself is asked (``--dryrun`` prints its ``TOP``). ``CUDA_HOME``/``CUDA_PATH``, when set, win.
    """
    import subprocess

    def has_headers(root):
        return bool(root) and os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or has_headers(cx.CUDA_HOME):
        return cx.CUDA_HOME if has_headers(cx.CUDA_HOME) else None
    try:
        r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        out = r.stderr + r.stdout  # nvcc prints its "#$ " lines on stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            root = os.path.realpath(line.split("=", 1)[1].strip())
            return root if has_headers(root) else None
    return None


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

    cpu_sources = rel("csrc/fusionblocks.cpp") + rel("csrc/autograd.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
    link = ["-fopenmp"]
    state = {"cuda": False, "cuda_note": None}

    def cpu_extension():
        return cx.CppExtension("fusionblocks._C", cpu_sources, extra_compile_args={"cxx": list(cxx)}, extra_link_args=link)

    explicit = _flag("FUSIONBLOCKS_CUDA")
    nvcc = shutil.which("nvcc") or (cx.CUDA_HOME and os.path.join(cx.CUDA_HOME, "bin", "nvcc"))
    has_nvcc = bool(nvcc) and os.path.exists(nvcc)
    want_cuda = explicit if explicit is not None else (torch.version.cuda is not None and has_nvcc)
    how = "FUSIONBLOCKS_CUDA=1" if explicit else "a CUDA torch and nvcc were found"
    if want_cuda and torch.version.cuda is None:
        state["cuda_note"] = f"{how} but torch {torch.__version__} is a CPU build"
        want_cuda = False
    elif want_cuda and not has_nvcc:
        state["cuda_note"] = f"{how} but nvcc was not found (PATH, CUDA_HOME)"
        want_cuda = False
    elif want_cuda:
        why = _cuda_unconfigurable(torch)
        root = _toolkit_root(cx, nvcc) if why is None else None
        if why is None and root is None:
            why = (f"the CUDA toolkit's headers (include/cuda_runtime.h) were not found for {nvcc} "
                   f"(torch looked in {cx.CUDA_HOME}); set CUDA_HOME to the toolkit's folder")
        if why is not None:
            state["cuda_note"] = f"{how} but the CUDA build cannot be configured: {why}"
            want_cuda = False
        elif root != cx.CUDA_HOME:
            cx.CUDA_HOME = root  # torch's build reads this module global when it compiles and links
            os.environ["CUDA_HOME"] = root
    if state["cuda_note"] is not None:
        _warn(state["cuda_note"], "building the CPU kernels only")
    if want_cuda:
        ext = cx.CUDAExtension(
            "fusionblocks._C",
            cpu_sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
            extra_compile_args={"cxx": cxx + ["-DFUSIONBLOCKS_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
        state["cuda"] = True
    else:
        ext = cpu_extension()

    def to_cpu_only(ext, error):
        """Turn the CUDA extension into the CPU-only one in place (BuildExtension's flags on it are kept)."""
        state["cuda"] = False
        state["cuda_note"] = f"the CUDA build failed ({type(error).__name__}: {error})"
        _warn(state["cuda_note"], "building the CPU kernels only")
        cpu = cpu_extension()
        for attr in ("sources", "include_dirs", "library_dirs", "libraries", "runtime_library_dirs", "define_macros"):
            setattr(ext, attr, list(getattr(cpu, attr) or []))
        args = dict(ext.extra_compile_args)
        args.pop("nvcc", None)
        args["cxx"] = [a for a in args.get("cxx", []) if a != "-DFUSIONBLOCKS_WITH_CUDA"]
        ext.extra_compile_args = args

    class OptionalBuildExt(cx.BuildExtension):
        """``BuildExtension`` that falls back from CUDA to CPU-only, whose failures warn instead of failing
        the install, and that records the outcome in ``fusionblocks/_C_build.json``."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure must leave a usable package
                if state["cuda"]:
                    for ext in self.extensions:
                        to_cpu_only(ext, e)
                    try:
                        super().run()
                    except Exception as e2:  # noqa: BLE001
                        self._failed(e2)
                else:
                    self._failed(e)
            self._record()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                if not state["cuda"]:
                    raise
                to_cpu_only(ext, e)
                super().build_extension(ext)

        def _failed(self, e):
            state["error"] = f"{type(e).__name__}: {e}"
            _warn(f"building fusionblocks._C failed ({state['error']})")

        def _record(self):
            """Write what was built and why not more, next to the extension (read at run time)."""
            import json

            for ext in self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(ext.name))
                os.makedirs(folder, exist_ok=True)
                note = {
                    "built": "error" not in state,
                    "cuda": bool(state["cuda"]) and "error" not in state,
                    "cuda_note": state["cuda_note"],
                    "error": state.get("error"),
                    "torch": torch.__version__,
                }
                with open(os.path.join(folder, NOTE_FILE), "w") as f:
                    json.dump(note, f, indent=1)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=cx.is_ninja_available())}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
