"""Interpose OpenBLAS under MLX's Linux CPU wheel, whose own BLAS is a slow reference one.

`cmeel-openblas` (with the system's libgfortran5) installs `libopenblas.so.0`; a script that calls
`reexec_with_openblas()` first re-runs itself once with it in LD_PRELOAD, so every MLX matmul in the process
uses it. Without the package, or when it cannot run here, nothing changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def openblas_library() -> str | None:
    try:
        import cmeel  # noqa: F401  (cmeel-openblas installs its libraries under cmeel.prefix)
    except ImportError:
        return None
    import site

    for base in site.getsitepackages():
        lib = Path(base) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if lib.exists() and _loads(lib):
            return str(lib)
    return None


def _loads(lib: Path) -> bool:
    """Preloading a library that cannot run here (no libgfortran5; cmeel-openblas 0.3.31 dies of SIGILL on some
    AMD CPUs) kills every exec'd process, so one small matmul tries it in a child process first."""
    import subprocess

    probe = "import mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))"
    env = {**os.environ, "LD_PRELOAD": str(lib)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"OpenBLAS not used: a matmul with {lib.name} preloaded exited with {done.returncode} "
              f"({done.stderr.strip()[-200:] or 'no message'})", file=sys.stderr)
    return done.returncode == 0


def reexec_with_openblas(enabled: bool = True) -> str:
    """Re-exec this process with OpenBLAS preloaded if available; returns which BLAS MLX uses, in words."""
    lib = openblas_library() if enabled else None
    if lib and lib not in os.environ.get("LD_PRELOAD", ""):
        os.environ["LD_PRELOAD"] = f"{lib}:{os.environ.get('LD_PRELOAD', '')}".rstrip(":")
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return "OpenBLAS (interposed)" if lib else "MLX wheel's own BLAS"
