"""Token sampling for the text-speech LM: repetition-aware sampling (RAS) and greedy decoding.

RAS (NOTES.md §2, golden README "Sampling") is nucleus sampling with a repetition check:

1. sort ``softmax(logp)`` descending (stable sort) and keep ids while the cumulated probability
   *before* the id is < ``top_p`` and fewer than ``top_k`` ids are kept;
2. draw one id among the kept ones with their (unnormalised) probabilities;
3. if that id occurs ``>= win_size * tau_r`` times among the last ``win_size`` generated tokens,
   set its score to -inf and draw from the full softmax instead.

Each draw is one ``torch.multinomial`` exactly as in the official code, so with the global RNG
(``generator=None``) the golden ``ras_demo_seed7_tokens`` are reproduced bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch

Sampler = Callable[[torch.Tensor, list[int]], int]
"""``sampler(logp, history) -> id``: ``logp`` is the (V,) log-softmax of the next step."""


def nucleus_candidates(logp: torch.Tensor, top_p: float = 0.8, top_k: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids the nucleus step may draw from, most probable first, and their probabilities."""
    probs, ids = logp.softmax(dim=0).sort(descending=True, stable=True)
    probs, ids = probs[:top_k], ids[:top_k]
    # id i is kept while the probability mass of ids 0..i-1 is below top_p (float32, as official)
    keep = 1 + int((probs.cumsum(dim=0)[:-1] < top_p).sum())
    return ids[:keep], probs[:keep]


def ras_sampling(logp: torch.Tensor, history: list[int], top_p: float = 0.8, top_k: int = 25,
                 win_size: int = 10, tau_r: float = 0.1, generator: torch.Generator | None = None) -> int:
    """Repetition-aware sampling of one id from a (V,) log-prob vector; ``logp`` is not modified."""
    ids, probs = nucleus_candidates(logp, top_p, top_k)
    token = int(ids[probs.multinomial(1, replacement=True, generator=generator)])
    if history[-win_size:].count(token) >= win_size * tau_r:
        scores = logp.clone()
        scores[token] = -float("inf")
        token = int(scores.softmax(dim=0).multinomial(1, replacement=True, generator=generator))
    return token


def greedy_sampling(logp: torch.Tensor, history: list[int]) -> int:
    """Arg-max decoding (deterministic; used by the golden ``greedy_inference_tokens``)."""
    return int(logp.argmax())
