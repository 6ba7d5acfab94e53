"""Timing helpers for the speed benchmarks (§2.5: eq. 11's d_lm, d_fm, d_voc): clocks synchronised with
the device, summaries over repeated requests, and the memory-bandwidth floor of one LM decode step.

A decode step multiplies one row by every weight of the decoder, so it cannot be faster than the
time to read those weights once; :func:`decode_floor` divides their bytes by a measured copy
bandwidth. Usage::

    sync = synchronizer(device)
    seconds, out = clock(lambda: flow.inference(...), sync)
    summary([0.21, 0.19, 0.25])                  # {'min', 'median', 'p90', 'n'}
    decode_floor(lm, copy_bandwidth(device))     # seconds per token at fp32 / bf16 weight bytes
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .lm import TextSpeechLM


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What makes a clock reading valid on ``device``: ``torch.cuda.synchronize`` (kernels run
    asynchronously on a GPU), nothing on the CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def clock(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``, the device synchronised before and after."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def summary(times: Sequence[float]) -> dict[str, float]:
    """min, median and 90th percentile (nearest rank) of ``times``, and their number."""
    if not times:
        raise ValueError("no times to summarise")
    ordered = sorted(times)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p90": ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)], "n": len(ordered)}


def repeat(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None,
           warmup: int = 1) -> dict[str, float]:
    """:func:`summary` of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return summary([clock(fn, sync)[0] for _ in range(repeats)])


def decode_weight_bytes(lm: TextSpeechLM, itemsize: int) -> int:
    """Bytes of weights one decode step reads at ``itemsize`` bytes per parameter: every decoder
    layer, the final norm and ``llm_decoder``. The input row is a single embedding row and Qwen's
    ``lm_head`` is never evaluated, so neither counts."""
    backbone = lm.llm.model.model
    return itemsize * sum(p.numel() for m in (backbone.layers, backbone.norm, lm.llm_decoder) for p in m.parameters())


def copy_bandwidth(device: str | torch.device = "cpu", nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s measured by copying a ``nbytes`` tensor (the bytes read plus the
    bytes written, over the best of ``repeats`` copies)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = min(clock(lambda: dst.copy_(src), synchronizer(device))[0] for _ in range(repeats))
    return 2 * nbytes / best


def decode_floor(lm: TextSpeechLM, bandwidth: float) -> dict[str, float]:
    """Lower bound on seconds per decode step at ``bandwidth`` bytes/s, for fp32 and bf16 weights,
    with the bytes it reads (``*_bytes``)."""
    out: dict[str, float] = {}
    for name, itemsize in (("fp32", 4), ("bf16", 2)):
        out[f"{name}_bytes"] = decode_weight_bytes(lm, itemsize)
        out[f"{name}_s"] = out[f"{name}_bytes"] / bandwidth
    return out
