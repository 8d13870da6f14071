"""Run environment: seeding, determinism, device, versions and git state, for results.json."""

from __future__ import annotations

import os
import random
import subprocess
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from pml_extras import _env

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/


def seed_everything(seed: int) -> None:
    """Seed python, numpy (also drives PML's MPerClassSampler via c_f.NUMPY_RANDOM) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def enable_determinism(device: torch.device) -> None:
    """CPU kernels used here are deterministic for a fixed thread count, so nothing is needed
    there (``torch.use_deterministic_algorithms`` costs seconds at first call: it imports
    torch._inductor). On CUDA ask for deterministic kernels (warn where none exists)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _env.device_name(device)
    return (
        f"cpu: {_env.cpu_model()} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cpus)"
    )


def _try_import_faiss():
    try:
        import faiss  # noqa: F401

        return faiss
    except ImportError:  # includes sys.modules["faiss"] = None (used by the tests)
        return None


def versions() -> Dict[str, str]:
    # The shared part from pml_extras._env, the one home of version strings.
    shared = _env.versions()
    keys = ("python", "torch", "pytorch_metric_learning", "numpy")
    v = {k: shared[k] for k in keys}
    v["pml_extras"] = shared["pml_extras"] or "unknown"
    faiss = _try_import_faiss()
    if faiss is not None:
        v["faiss"] = getattr(faiss, "__version__", "unknown")
    try:
        import sklearn

        v["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    return v


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=_HERE,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def git_modified(paths: Sequence[str]) -> Optional[bool]:
    """True when ``paths`` differ from the checked-out commit (results made by uncommitted code)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=_HERE,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except Exception:
        return None
