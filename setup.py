"""The one compiled part of primasim: the GGUF kernels (runtime/kernels/*.cc -> primasim.runtime.kernels._qk).

Everything else about the package is declared in pyproject.toml; this file only adds the
extension. It is a plain shared library (no Python API: loaded with ctypes, its handlers
registered with jax.ffi), built against the XLA FFI headers of the jax that builds it
(pinned in [build-system].requires to the runtime's jax), for the baseline x86-64 ISA: the
AVX2 and AVX-512 kernels carry their own `#pragma GCC target` and are chosen at run time by CPUID.
No -march=native, no -ffast-math (it would flip FTZ/DAZ for the whole Python process).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "runtime/kernels"
SOURCES = [f"{KERNELS}/qk_{n}.cc" for n in ("ffi", "attn", "scalar", "avx2", "avx512")]


class BuildKernels(build_ext):
    """build_ext with jax's FFI headers on the include path and the sources compiled in parallel."""

    def build_extensions(self) -> None:
        from jax import ffi

        for ext in self.extensions:
            ext.include_dirs.append(ffi.include_dir())
        self.compiler.compile = _parallel_compile.__get__(self.compiler)  # type: ignore[method-assign]
        super().build_extensions()


def _parallel_compile(self: Any, sources: list[str], output_dir: str | None = None, macros: Any = None,
                      include_dirs: Any = None, debug: int = 0, extra_preargs: Any = None,
                      extra_postargs: Any = None, depends: Any = None) -> list[str]:
    """distutils' CCompiler.compile, one source per thread (the four units take similar time)."""
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj: str) -> None:
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    with ThreadPoolExecutor(max_workers=min(len(objects), os.cpu_count() or 1)) as pool:
        list(pool.map(one, objects))
    return objects


setup(
    ext_modules=[Extension(
        "primasim.runtime.kernels._qk",
        sources=SOURCES,
        depends=[f"{KERNELS}/qk.h"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O3", "-fno-math-errno", "-fvisibility=hidden",
                            "-Wno-maybe-uninitialized", "-Wno-uninitialized"],  # GCC 12's own intrinsics headers
    )],
    cmdclass={"build_ext": BuildKernels},
)
