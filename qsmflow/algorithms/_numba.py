"""Shared numba plumbing for the compiled kernels: compiling with an on-disk cache when one can
be written, and running parallel loops on a given number of threads."""

from __future__ import annotations

from collections.abc import Callable


def jit(func: Callable, **options) -> Callable:
    """``numba.njit(cache=True, **options)(func)``, without the cache where none can be written
    (read-only installs, containers: numba raises "cannot cache function ...")."""
    import numba

    try:
        return numba.njit(cache=True, **options)(func)
    except RuntimeError:
        return numba.njit(cache=False, **options)(func)


class numba_threads:
    """Context manager: numba's parallel loops run on ``n`` threads (at most numba's pool size)
    inside the block; the previous setting is restored after it."""

    def __init__(self, n: int) -> None:
        import numba

        self._numba = numba
        self._n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))

    def __enter__(self) -> numba_threads:
        self._old = self._numba.get_num_threads()
        self._numba.set_num_threads(self._n)
        return self

    def __exit__(self, *exc) -> None:
        self._numba.set_num_threads(self._old)
