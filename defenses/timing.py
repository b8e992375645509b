"""How a run measures what each row cost: wall and CPU time, and the clock a cost ratio is read from."""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from attacks.plumbing import model_device

__all__ = ["timed", "cost_clock"]


def timed(fn: Callable, *args, **kwargs) -> tuple:
    """``(fn(*args, **kwargs), {"wall": seconds, "cpu": seconds})``: wall time and this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def cost_clock(model: nn.Module) -> str:
    """The clock a cost ratio is read from: ``"cpu"`` (this process's CPU time, which other jobs on a shared
    machine do not inflate) for a model on the CPU, ``"wall"`` on an accelerator (whose work CPU time misses)."""
    return "cpu" if model_device(model).type == "cpu" else "wall"
