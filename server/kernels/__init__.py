"""Fused CPU kernels for mixed-batch adapter work, built once with the system C++ compiler.

``load(build_root)`` compiles ``adapters_cpu.cpp`` (which includes ``spectral_cpu.cpp``: one
translation unit; torch's C++ extension builder, about 30 s the first time on a 2-core machine;
later starts load the cached library in well under a second)
and returns a ``CpuKernels`` handle, or ``None`` when no compiler is available or the build
fails: the engine then serves with the plain torch code of ``server/methods`` (same results,
slower on CPU). A compiler without OpenMP gets a single-threaded build (the same results) rather
than none. The build folder is keyed by the CPU's instruction-set flags (the code is compiled for
the machine it runs on, ``-march=native``), torch's version, the sources' folder and their
contents, so two checkouts or versions of Facet on one machine (a test run beside a server, an
upgrade) each build and keep their own library instead of rebuilding over the other's. Within
one folder ninja still tracks the sources and the files they include (compiler depfiles) against
the library.

The kernels serve float32 and bfloat16 activations (tables of either dtype), with float32
arithmetic and accumulation throughout.

Which (family, signature, hook) has a kernel is decided in ``fast.py``.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path

log = logging.getLogger("facet.kernels")

SOURCE = Path(__file__).with_name("adapters_cpu.cpp")
# -O3 vectorises the row loops; the reassociation flags let it vectorise the dot products too
# (the summation order then differs from torch's, within float32 rounding). -fopenmp: ATen's
# ``at::parallel_for`` is a header template that runs serially unless the extension itself is
# built with OpenMP (without it every kernel ran on one thread, however many torch had). The
# module then needs libgomp.so.1, the soname of the libgomp torch's wheel bundles and has already
# loaded, so both share torch's one OpenMP runtime and thread pool.
CFLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fopenmp",
]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_loaded: dict[Path, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _sources_digest(folder: Path) -> str:
    """The contents of every C++ source here (the main file includes the others)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.cpp")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _build_key(sources: Path) -> str:
    import torch

    where = Path(sources).resolve()  # a checkout of its own: builds never race over one folder
    key = f"{platform.machine()} {_cpu_flags()} torch {torch.__version__} {where} {_sources_digest(sources)}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def build_dir(build_root: Path, sources: Path = SOURCE.parent) -> Path:
    return Path(build_root) / f"adapters_cpu-{_build_key(sources)}"


def load(build_root: Path, verbose: bool = False):
    """The compiled kernel module, or None (logged) when it cannot be built here."""
    folder = build_dir(build_root)
    with _lock:
        if folder in _loaded:
            return _loaded[folder]
        module = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not any(folder.glob("*.so")):
                log.info("compiling the CPU adapter kernels once (about 30 s on 2 cores) into %s", folder)
            try:
                module = _build(folder, CFLAGS, LDFLAGS, verbose)
            except Exception as e:  # e.g. a compiler without OpenMP (clang without libomp)
                log.warning(
                    "CPU adapter kernels: the OpenMP build failed (%s); building them single-threaded",
                    str(e).splitlines()[0][:200],
                )
                module = _build(folder, [f for f in CFLAGS if f != "-fopenmp"], [], verbose)
        except Exception as e:  # no compiler, headers missing, ...: serve with the torch code
            log.warning(
                "CPU adapter kernels unavailable (%s); using the torch code", str(e).splitlines()[0][:200]
            )
        _loaded[folder] = module
        return module


def _build(folder: Path, cflags: list[str], ldflags: list[str], verbose: bool):
    from torch.utils.cpp_extension import load as build

    return build(
        name="facet_adapters_cpu",
        sources=[str(SOURCE)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(folder),
        verbose=verbose,
    )
