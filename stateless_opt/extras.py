"""Optional dependencies by door. The core needs torch, pydantic and psutil; each door checks for its
extra when it is imported and names the ``pip install`` that brings it (pyproject.toml lists the same
extras; tests/test_launch_install.py keeps the two in step)."""

from __future__ import annotations

import importlib.util
import sys

# extra -> the modules its packages provide (import names: PyYAML is ``yaml``)
EXTRAS: dict[str, tuple[str, ...]] = {
    "deepspeed": ("deepspeed",),
    "hf": ("transformers", "accelerate"),
    "launch": ("transformers", "tokenizers", "yaml", "tqdm", "matplotlib", "numpy"),
}


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked (python -X importtime, tests)
    return importlib.util.find_spec(module) is not None


def require(extra: str, door: str) -> None:
    """Raise ``ImportError`` naming ``pip install 'stateless-opt[extra]'`` if a module of ``extra`` is
    missing. Cheap: looks the modules up without importing them."""
    missing = [m for m in EXTRAS[extra] if not _importable(m)]
    if missing:
        raise ImportError(
            f"{door} needs the '{extra}' extra (not installed: {', '.join(missing)}): "
            f"pip install 'stateless-opt[{extra}]'"
        )
