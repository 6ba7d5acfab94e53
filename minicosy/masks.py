"""Attention masks of the chunk-aware flow (§2.4; NOTES.md §4, §4a).

All masks are boolean, ``True`` = "may attend". The official code needs only padding masks and one
static chunk mask (25 tokens before the encoder's up-sampling, 50 mel frames after it and in the
estimator). The paper trains one model under four masks, drawn uniformly per sample:

=================  ==========================================  =================================
kind               frame i may attend                          use
=================  ==========================================  =================================
``NON_CAUSAL``     every frame                                 offline synthesis
``FULL_CAUSAL``    frames <= i                                 lowest latency
``CHUNK_M``        its own chunk of M frames and all before    first streaming chunk
``CHUNK_2M``       its own chunk of 2M frames and all before   later chunks (cascade)
=================  ==========================================  =================================

Every kind is a chunk mask: chunk size "unlimited" (0), 1, M or 2M (``chunk_size_of``). The
official streaming mask is ``CHUNK_M`` with M = ``STATIC_CHUNK_TOKENS`` tokens (encoder, before
up-sampling) or ``STATIC_CHUNK_FRAMES`` frames (after it).

Usage::

    pad = ~make_pad_mask(lengths).unsqueeze(1)                  # (B, 1, T)
    kinds = sample_training_mask(B, generator=g)                # (B,) in 0..3
    allowed = batch_chunk_mask(pad, kinds, STATIC_CHUNK_FRAMES) # (B, T, T)
    bias = mask_to_bias(allowed, torch.float32)                 # 0 / -1e10
"""
from __future__ import annotations

import torch

NON_CAUSAL, FULL_CAUSAL, CHUNK_M, CHUNK_2M = range(4)
MASK_NAMES = ("non_causal", "full_causal", "chunk_m", "chunk_2m")
STATIC_CHUNK_TOKENS = 25   # official encoder chunk before up-sampling (= the LM's 25-token hop)
STATIC_CHUNK_FRAMES = 50   # after the x2 up-sampling, and in the estimator


def make_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """(B, max_len) bool, ``True`` at padding positions; ``max_len`` 0 means ``lengths.max()``."""
    max_len = max_len if max_len > 0 else int(lengths.max())
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


def subsequent_chunk_mask(size: int, chunk_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(size, size): row i sees every column before the end of its chunk, ``(i // c + 1) * c``.
    The official helper takes a number of left chunks and ignores it; so does this one (all past)."""
    pos = torch.arange(size, device=device)
    return pos.unsqueeze(0) < ((pos // chunk_size + 1) * chunk_size).unsqueeze(1)


def _force_nonempty_rows(mask: torch.Tensor) -> torch.Tensor:
    """Rows that would attend nothing attend everything (official safeguard; such rows are padding
    and are masked again later). Avoids NaNs from softmax over all -inf."""
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


def add_optional_chunk_mask(masks: torch.Tensor, static_chunk_size: int) -> torch.Tensor:
    """The official ``add_optional_chunk_mask`` as the flow uses it (no dynamic chunks): with a
    static chunk > 0 the (B, 1, T) padding mask AND the chunk mask -> (B, T, T); with 0 the padding
    mask is returned unchanged."""
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {masks.dtype}")
    if static_chunk_size > 0:
        masks = masks & subsequent_chunk_mask(masks.shape[-1], static_chunk_size, masks.device).unsqueeze(0)
    return _force_nonempty_rows(masks)


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias: 0 where allowed, -1e10 where not (official ``mask_to_bias``)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    return (1.0 - mask.to(dtype)) * -1.0e10


# ---- the paper's four masks (§2.4) -------------------------------------------------------------
def non_causal_mask(size: int, device: torch.device | None = None) -> torch.Tensor:
    """Every frame sees every frame (offline mode)."""
    return torch.ones(size, size, dtype=torch.bool, device=device)


def full_causal_mask(size: int, device: torch.device | None = None) -> torch.Tensor:
    """Frame i sees frames 0..i only."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def chunk_m_mask(size: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """Frame i sees the past and the rest of its M-frame chunk (up to M-1 future frames)."""
    return subsequent_chunk_mask(size, m, device)


def chunk_2m_mask(size: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """As ``chunk_m_mask`` with chunks of 2M frames: more look-ahead, closer to offline quality."""
    return subsequent_chunk_mask(size, 2 * m, device)


def chunk_size_of(kind: int, m: int) -> int:
    """The chunk size that realises a mask kind: 0 (unlimited), 1, M or 2M."""
    if kind not in range(4):
        raise ValueError(f"mask kind must be one of 0..3 {MASK_NAMES}, got {kind}")
    return (0, 1, m, 2 * m)[kind]


def batch_chunk_mask(pad_mask: torch.Tensor, kinds: torch.Tensor | int, m: int) -> torch.Tensor:
    """Per-sample attention masks (B, T, T) = padding mask (B, 1, T) AND the mask of each sample's
    kind (an int for the whole batch or a (B,) tensor), with chunk unit ``m``."""
    batch, _, size = pad_mask.shape
    kinds = torch.as_tensor(kinds, device=pad_mask.device).expand(batch)
    if kinds.min() < 0 or kinds.max() > 3:
        raise ValueError(f"mask kinds must be in 0..3 {MASK_NAMES}, got {kinds.tolist()}")
    chunk = torch.tensor([chunk_size_of(k, m) for k in range(4)], device=pad_mask.device)[kinds]  # (B,)
    pos = torch.arange(size, device=pad_mask.device)
    end = torch.where(chunk.unsqueeze(1) > 0,
                      (pos // chunk.clamp(min=1).unsqueeze(1) + 1) * chunk.unsqueeze(1), size)  # (B, T)
    allowed = pos.view(1, 1, size) < end.unsqueeze(2)
    return _force_nonempty_rows(allowed & pad_mask)


def sample_training_mask(batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | None = None) -> torch.Tensor:
    """One of the four mask kinds per training sample, uniformly (§2.4): (B,) int64 in 0..3."""
    draw_on = generator.device if generator is not None else device
    return torch.randint(0, 4, (batch_size,), generator=generator, device=draw_on).to(device)
