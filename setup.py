"""Build rtdetr_kernels (the folder kernels/) and rtdetr, with the extension rtdetr_kernels._C.

The CPU C++ sources are always compiled. The CUDA sources are compiled when torch has CUDA and
nvcc is found, or when FORCE_CUDA=1; RTDETR_KERNELS_NO_CUDA=1 skips them. TORCH_CUDA_ARCH_LIST
picks the architectures (default 8.0;8.6;8.9;9.0+PTX). MAX_JOBS defaults to what the machine's
cores and memory allow. No network is needed: torch must already be installed, and the build
uses that torch, so pip's build isolation (which would hide it) must be off:
pip install --no-build-isolation -e .   (or: pip wheel --no-build-isolation .)

The torch version the extension is built against is compiled into it (_C.TORCH_VERSION) and
written next to it as rtdetr_kernels/_build_info.json (also inside a wheel); at import the package
refuses an extension built against another torch (kernels/_extension.py) and falls back.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
BUILD_INFO = "_build_info.json"  # written next to the built extension; read by kernels/_extension.py
NO_TORCH = ("rtdetr-kernels: setup.py cannot import torch. The extension is built against the torch you have "
            "installed, so build without pip's build isolation (which hides it): pip install --no-build-isolation . "
            "(install torch first if there is none)")


def find_cuda_home():
    """The CUDA toolkit root. nvcc may be a wrapper script outside the toolkit (then torch's guess
    from nvcc's location is wrong), so ask nvcc itself: `nvcc -v` prints the root as TOP."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-v", os.devnull], capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
        if match:
            return os.path.realpath(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return max(1, min(cores, int(mem_gb // 3)))  # about 3 GB per compiler process


def import_torch():
    """torch, or a one-line exit saying what to run (pip's isolated build environment has no torch)."""
    try:
        import torch
    except ImportError:
        sys.exit(NO_TORCH)
    return torch


def extensions():
    torch = import_torch()
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_home = find_cuda_home()
    if not want_cuda and os.environ.get("RTDETR_KERNELS_NO_CUDA", "0") != "1":
        want_cuda = torch.version.cuda is not None and cuda_home is not None
    if os.environ.get("RTDETR_KERNELS_NO_CUDA", "0") == "1":
        want_cuda = False
    if want_cuda:
        if cuda_home is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root")
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch guessed it at import time
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/schema.cpp") + glob.glob("csrc/*/cpu.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C"), ("RTDETR_TORCH_VERSION", f'"{torch.__version__}"')]
    extra_link = ["-fopenmp"]
    if not want_cuda:
        ext = cpp_extension.CppExtension
        sources = cpp_sources
        nvcc_flags = []
    else:
        ext = cpp_extension.CUDAExtension
        sources = cpp_sources + sorted(glob.glob("csrc/*/cuda_ops.cpp") + glob.glob("csrc/*/cuda.cu"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("RTDETR_WITH_CUDA", "1"), ("RTDETR_CUDA_ARCHS", f'"{archs}"'),
                          ("RTDETR_CUDA_VERSION", f'"{torch.version.cuda}"')]
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    kwargs = dict(
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if want_cuda else {"cxx": cxx_flags},
        extra_link_args=extra_link,
    )
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "with_cuda": want_cuda,
            "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if want_cuda else "",
            "python": "%d.%d" % sys.version_info[:2]}
    return [ext("rtdetr_kernels._C", **kwargs)], build_ext_class(cpp_extension.BuildExtension, info)


def build_ext_class(base, info):
    """torch's BuildExtension (ninja) that also writes ``info`` as _build_info.json next to the built
    extension: in the build tree (what a wheel packs) and, for editable/in-place builds, in kernels/."""

    class BuildExtension(base):
        def run(self):
            super().run()
            inplace, folders = self.inplace, set()
            try:
                for where in (False, inplace):  # the build tree, then the source tree when in place
                    self.inplace = where
                    folders.update(os.path.dirname(os.path.abspath(self.get_ext_fullpath(e.name))) for e in self.extensions)
            finally:
                self.inplace = inplace
            for folder in sorted(folders):
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_INFO), "w") as f:
                    json.dump(info, f, indent=1, sort_keys=True)
                    f.write("\n")

    return BuildExtension.with_options(use_ninja=True)


def main():
    from setuptools import setup  # here, so that `from setup import find_cuda_home` needs no setuptools

    ext_modules, build_ext = extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext},
        package_dir={"rtdetr_kernels": "kernels", "rtdetr": "rtdetr"},
        packages=_packages(),
    )


def _packages():
    pkgs = []
    for folder, name in (("kernels", "rtdetr_kernels"), ("rtdetr", "rtdetr")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                pkgs.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return pkgs


if __name__ == "__main__":
    main()
