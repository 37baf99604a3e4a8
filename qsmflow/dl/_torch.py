"""Lazy PyTorch import: the core install stays light, deep-learning methods say what is missing."""

from __future__ import annotations

import importlib

__all__ = ["require_torch"]


def require_torch(method: str = "deep-learning"):
    """Return the ``torch`` module, or raise ``ImportError`` naming the extra to install."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(
            f"method {method!r} needs PyTorch, which is not installed: "
            "pip install 'qsmflow[dl]' (or pip install torch)"
        ) from exc
