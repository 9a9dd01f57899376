"""Two independent CPU computations of the geometric step at once: one on the caller's thread,
one on a helper thread.

The step runs with one intra-op thread (``optimizer._one_cpu_thread``): its QRs and SVDs are
too small for OpenMP to split, and OpenMP's threads spin-wait on each other on a loaded CPU. Yet
two of its pairs are independent: the QRs of ``[U | D_K]`` and ``[V | D_L]``, and the SVD of
``Ŝ`` beside the spectral norm of the shrinkage's ``ΔŜ``. Where the user allows more than one
thread, :func:`side_by_side` runs the second of a pair on a helper thread while the caller runs
the first (torch releases the GIL inside each op). Each computation stays whole on one thread, so
the results are bitwise those of running them in turn; and a thread that waits for the other
blocks instead of spinning, so on a busy CPU the pair only runs in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["side_by_side"]

A = TypeVar("A")
B = TypeVar("B")
_helper: ThreadPoolExecutor | None = None


def _without_grad(compute: Callable[[], B]) -> B:
    with torch.no_grad():  # grad mode is per thread; the step's tensors need no graph
        return compute()


def side_by_side(first: Callable[[], A], second: Callable[[], B], parallel: bool) -> tuple[A, B]:
    """``(first(), second())``, the two run at once on two threads where ``parallel``."""
    global _helper
    if not parallel:
        return first(), second()
    if _helper is None:
        _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geolora-step")
    pending = _helper.submit(_without_grad, second)
    try:
        done = first()
    finally:
        other = pending.result()
    return done, other
