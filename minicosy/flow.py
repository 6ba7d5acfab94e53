"""Chunk-aware causal flow matching: speech tokens + prompt mel + speaker -> mel (§2.4; NOTES.md §4, §4a).

* ``CausalConditionalCFM``: the OT conditional flow (eqs. 3-6), its training loss (eq. 8) and the
  Euler ODE solver with the cosine schedule (eq. 9) and classifier-free guidance (eq. 10).
* ``CausalMaskedDiffWithXvec``: the whole flow model of Fig. 1(c) / Fig. 3 — token embedding,
  token encoder (``flow_encoder``), ``encoder_proj`` -> μ, x-vector projection, CFM with the UNet
  (``flow_estimator``). Parameter names equal the official ``flow.pt`` keys.
* ``stream_inference``: token-to-mel streaming as the official orchestration runs it (NOTES.md §3).
* Training on the corpus (``python -m minicosy.train flow``): ``load_flow_data`` (speech tokens of
  the tiny tokenizer, 24 kHz mels, CAM++ x-vectors), ``train_flow`` and the held-out mel L1 per mask.

Training recipes (``FlowConfig.training_recipe``):

=============  ===============================================  ====================================
               ``"paper"`` (§2.4, default)                      ``"official"`` (NOTES.md §4a)
=============  ===============================================  ====================================
masks          one of the four masks per sample, uniformly      static chunk or none, one coin/batch
prompt X̃_1     first 0-30% of the target frames, every sample   same, but only for half the samples
loss           L1 on the frames to generate (eq. 8)             MSE over all frames
=============  ===============================================  ====================================

Both drop μ, v and X̃_1 together with probability 0.2 (CFG training) and draw t ~ U[0, 1].

Usage::

    flow = CausalMaskedDiffWithXvec(get_config("tiny").flow)
    loss = flow(token, token_len, feat, embedding, generator=g)["loss"]
    mel = flow.inference(token, prompt_token, prompt_feat, embedding, streaming=True, finalize=False)
    path = flow.decoder.sample_path(*flow.conditions(token, prompt_token, prompt_feat, embedding)[:4],
                                    schedule="linear")                # (NFE+1, 1, 80, frames)
    for mel_chunk in stream_inference(flow, token, prompt_token, prompt_feat, embedding): ...
    flow = CausalMaskedDiffWithXvec.from_checkpoint("data/checkpoints/flow_tiny.pt")
    load_flow_state_dict(flow, "flow.pt")                         # official checkpoint, strict
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import load_wav, mel_spectrogram
from .config import FlowConfig, get_config
from .data import checkpoint_cache, feature_cache, load_manifest
from .flow_encoder import UpsampleConformerEncoder
from .flow_estimator import Attention, CausalConditionalDecoder
from .masks import CHUNK_M, MASK_NAMES, NON_CAUSAL, chunk_size_of, make_pad_mask, sample_training_mask
from .train import (TrainConfig, load_checkpoint, load_state_dict_checked, model_from_checkpoint, read_torch_file,
                    recipe_parser, save_checkpoint, seed_everything, state_file, train_loop)

MAX_FIXED_NOISE_FRAMES = 15000   # 300 s of mel at 50 Hz


@functools.cache
def fixed_noise(n_mels: int = 80) -> torch.Tensor:
    """The official initial noise X_0: ``randn(1, n_mels, 15000)`` right after seeding 0 (NOTES.md §4),
    drawn from a private generator so that the global RNG is left alone. CPU, shared, read-only."""
    return torch.randn(1, n_mels, MAX_FIXED_NOISE_FRAMES, generator=torch.Generator().manual_seed(0))


def cosine_t_span(n_timesteps: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eq. 9: the n+1 ODE times t = 1 - cos(s·π/2) for s uniform on [0, 1] (dense near t = 0)."""
    return 1 - torch.cos(torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype) * 0.5 * math.pi)


def _draw(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor,
          normal: bool = False) -> torch.Tensor:
    """U[0, 1) (or N(0, 1)) draws from ``generator`` on its own device, moved next to ``like``."""
    device = generator.device if generator is not None else like.device
    return (torch.randn if normal else torch.rand)(shape, generator=generator, device=device).to(like)


class CausalConditionalCFM(nn.Module):
    """Conditional flow matching on the OT path φ_t = (1-(1-σ)t)·X_0 + t·X_1 (eqs. 3-6)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.estimator = CausalConditionalDecoder(cfg)

    def initial_noise(self, mu: torch.Tensor, generator: torch.Generator | None, offset: int = 0) -> torch.Tensor:
        """X_0 for (B, 80, T): the official fixed noise at frames offset..offset+T-1, or fresh
        N(0, I) from ``generator``."""
        b, c, t = mu.shape
        if generator is not None:
            return _draw((b, c, t), generator, mu, normal=True)
        if offset + t > MAX_FIXED_NOISE_FRAMES:
            raise ValueError(f"{offset + t} frames exceed the official fixed noise ({MAX_FIXED_NOISE_FRAMES} frames); "
                             "pass a torch.Generator for fresh noise")
        return fixed_noise(c)[:, :, offset:offset + t].to(mu).expand(b, -1, -1)

    @torch.inference_mode()
    def sample_path(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                    mask_kind: int | torch.Tensor = NON_CAUSAL, n_timesteps: int | None = None,
                    temperature: float = 1.0, generator: torch.Generator | None = None,
                    cfg_rate: float | None = None, schedule: str = "cosine",
                    caches: list[dict] | None = None, offset: int = 0) -> torch.Tensor:
        """The whole Euler trajectory X_{t_0..t_n} (n+1, B, 80, T) on the cosine (eq. 9) or linear
        grid, with CFG (eq. 10): the conditional and the unconditional (μ, v, X̃_1 = 0) velocity
        come from one batch of 2B rows and mix as (1+β)·v_cond - β·v_uncond, β = ``cfg_rate``
        (default ``cfg.cfg_rate``). mu, cond (B, 80, T); mask (B, 1, T); spks (B, 80).
        ``caches`` (one dict per step) and ``offset``: incremental streaming, see the estimator."""
        n_timesteps = n_timesteps or self.cfg.n_timesteps
        beta = self.cfg.cfg_rate if cfg_rate is None else cfg_rate
        if schedule == "cosine":
            t_span = cosine_t_span(n_timesteps, mu.device, mu.dtype)
        elif schedule == "linear":
            t_span = torch.linspace(0, 1, n_timesteps + 1, device=mu.device, dtype=mu.dtype)
        else:
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        if caches is not None and len(caches) != n_timesteps:
            raise ValueError(f"need one cache per ODE step ({n_timesteps}), got {len(caches)}")
        x = self.initial_noise(mu, generator, offset) * temperature
        mask2, mu2 = torch.cat([mask, mask]), torch.cat([mu, torch.zeros_like(mu)])
        spks2, cond2 = torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, torch.zeros_like(cond)])
        kind2 = torch.cat([torch.as_tensor(mask_kind, device=mu.device).expand(mu.shape[0])] * 2)
        t, dt = t_span[:1], t_span[1] - t_span[0]
        path = [x]
        for step in range(1, n_timesteps + 1):
            v = self.estimator(torch.cat([x, x]), mask2, mu2, t.expand(2 * x.shape[0]), spks2, cond2, kind2,
                               None if caches is None else caches[step - 1], offset)
            v_cond, v_uncond = v.chunk(2)
            x = x + dt * ((1.0 + beta) * v_cond - beta * v_uncond)
            path.append(x)
            t = t + dt
            if step < n_timesteps:
                dt = t_span[step + 1] - t
        return torch.stack(path)

    def forward(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                mask_kind: int | torch.Tensor = NON_CAUSAL, n_timesteps: int | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None,
                cfg_rate: float | None = None) -> torch.Tensor:
        """Sample X_1 (B, 80, T): the end of :meth:`sample_path` on the cosine grid (the official solver)."""
        return self.sample_path(mu, mask, spks, cond, mask_kind, n_timesteps, temperature, generator, cfg_rate)[-1]

    def compute_loss(self, x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
                     cond: torch.Tensor, mask_kind: int | torch.Tensor, loss_mask: torch.Tensor,
                     loss_type: str = "l1", generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss (eq. 8): t ~ U[0,1], X_0 ~ N(0, I), target velocity u = X_1 - (1-σ)X_0,
        conditions dropped together with probability ``training_cfg_rate``; L1 or MSE averaged over
        the frames of ``loss_mask`` (B, 1, T) and the mel bins."""
        b = x1.shape[0]
        sigma = self.cfg.sigma_min
        t = _draw((b, 1, 1), generator, x1)
        z = _draw(tuple(x1.shape), generator, x1, normal=True)
        y = (1 - (1 - sigma) * t) * z + t * x1
        u = x1 - (1 - sigma) * z
        keep = (_draw((b,), generator, x1) > self.cfg.training_cfg_rate).to(x1)
        pred = self.estimator(y, mask, mu * keep.view(-1, 1, 1), t.view(b), spks * keep.view(-1, 1),
                              cond * keep.view(-1, 1, 1), mask_kind)
        if loss_type == "l1":
            err = (pred - u).abs()
        elif loss_type == "mse":
            err = (pred - u) ** 2
        else:
            raise ValueError(f"loss_type must be 'l1' or 'mse', got {loss_type!r}")
        return (err * loss_mask).sum() / (loss_mask.sum().clamp(min=1) * x1.shape[1])


class CausalMaskedDiffWithXvec(nn.Module):
    """The flow model: speech tokens + speaker x-vector + prompt mel -> mel (official
    ``CausalMaskedDiffWithXvec``). Per-request state lives in the call, never on the module."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        if cfg.training_recipe not in ("paper", "official"):
            raise ValueError(f"training_recipe must be 'paper' or 'official', got {cfg.training_recipe!r}")
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.n_mels)
        self.encoder = UpsampleConformerEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.encoder_size, cfg.n_mels)
        self.decoder = CausalConditionalCFM(cfg)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """x-vector (B, 192) -> L2-normalised -> Linear -> v (B, 80)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def embed_tokens(self, token: torch.Tensor, token_len: torch.Tensor) -> torch.Tensor:
        """(B, T) ids (padding may be negative) -> (B, T, input_size), zero at padding."""
        keep = ~make_pad_mask(token_len, token.shape[1])
        return self.input_embedding(token.clamp(min=0).long()) * keep.unsqueeze(-1).to(self.input_embedding.weight)

    def encode(self, token: torch.Tensor, token_len: torch.Tensor, context: torch.Tensor | None = None,
               mask_kind: int | torch.Tensor = NON_CAUSAL) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings -> μ (B, 80, ratio·T) and the frame padding mask (B, 1, ratio·T) float."""
        h, pad = self.encoder(token, token_len, context, mask_kind)
        return self.encoder_proj(h).transpose(1, 2), pad.to(h.dtype)

    def forward(self, token: torch.Tensor, token_len: torch.Tensor, feat: torch.Tensor,
                embedding: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training loss for tokens (B, T) with lengths (B,), target mel ``feat`` (B, ratio·T, 80)
        (padded like the tokens) and x-vectors (B, 192), following ``cfg.training_recipe``."""
        b, n_tok = token.shape
        frames = self.cfg.token_mel_ratio * n_tok
        if feat.shape[:2] != (b, frames) or feat.shape[2] != self.cfg.n_mels:
            raise ValueError(f"feat must be (B, {self.cfg.token_mel_ratio}·T, {self.cfg.n_mels}) = "
                             f"({b}, {frames}, {self.cfg.n_mels}) for tokens {tuple(token.shape)}, got {tuple(feat.shape)}")
        paper = self.cfg.training_recipe == "paper"
        if paper:
            kinds = sample_training_mask(b, generator, token.device)
        else:
            kinds = CHUNK_M if float(_draw((1,), generator, feat)) < 0.5 else NON_CAUSAL
        mu, mask = self.encode(self.embed_tokens(token, token_len), token_len, mask_kind=kinds)

        # prompt X̃_1: keep the first 0-30% of each target, i.e. mask out the final 70-100% (§2.4)
        lengths = mask.sum(dim=(1, 2))
        low, high = self.cfg.prompt_mask_ratio
        masked_share = low + (high - low) * _draw((b,), generator, feat)
        prompt_len = ((1 - masked_share) * lengths).floor()
        if not paper:   # official: no prompt for half of the samples
            prompt_len = prompt_len * (_draw((b,), generator, feat) >= 0.5)
        is_prompt = (torch.arange(frames, device=feat.device).view(1, 1, -1) < prompt_len.view(-1, 1, 1)).to(feat)
        x1 = feat.transpose(1, 2)
        cond = x1 * is_prompt
        loss_mask = mask * (1 - is_prompt) if paper else mask
        loss = self.decoder.compute_loss(x1, mask, mu, self.speaker(embedding), cond, kinds, loss_mask,
                                         "l1" if paper else "mse", generator)
        return {"loss": loss}

    @torch.inference_mode()
    def conditions(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                   embedding: torch.Tensor, finalize: bool = True, mask_kind: int = NON_CAUSAL
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The CFM conditions of one request: μ (1, 80, F), mask (1, 1, F), v (1, 80), X̃_1 (1, 80, F)
        holding the prompt mel in its first frames, and the number of prompt frames. Prompt tokens
        go in front of ``token``; ``finalize=False`` uses the last P tokens only as look-ahead."""
        ratio, look = self.cfg.token_mel_ratio, self.cfg.pre_lookahead_len
        if token.dim() != 2 or token.shape[0] != 1 or prompt_token.dim() != 2 or prompt_token.shape[0] != 1:
            raise ValueError(f"token and prompt_token must be (1, T), got {tuple(token.shape)} and "
                             f"{tuple(prompt_token.shape)}")
        if prompt_feat.shape != (1, ratio * prompt_token.shape[1], self.cfg.n_mels):
            raise ValueError(f"prompt_feat must be (1, {ratio}·{prompt_token.shape[1]}, {self.cfg.n_mels}), "
                             f"got {tuple(prompt_feat.shape)}")
        if embedding.shape != (1, self.cfg.spk_embed_dim):
            raise ValueError(f"embedding must be (1, {self.cfg.spk_embed_dim}), got {tuple(embedding.shape)}")
        if not finalize and token.shape[1] <= look:
            raise ValueError(f"finalize=False needs more than pre_lookahead_len={look} tokens, got {token.shape[1]}")
        device = self.input_embedding.weight.device
        tokens = torch.cat([prompt_token.to(device), token.to(device)], dim=1)
        x = self.embed_tokens(tokens, torch.tensor([tokens.shape[1]], device=device))
        context = None
        if not finalize:
            x, context = x[:, :-look], x[:, -look:]
        mu, mask = self.encode(x, torch.tensor([x.shape[1]], device=x.device), context, mask_kind)
        n_prompt = prompt_feat.shape[1]
        cond = torch.zeros_like(mu)
        cond[:, :, :n_prompt] = prompt_feat.transpose(1, 2).to(mu)
        return mu, mask, self.speaker(embedding.to(mu)), cond, n_prompt

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool = False, finalize: bool = True,
                  n_timesteps: int | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None, mask_kind: int | None = None,
                  cfg_rate: float | None = None) -> torch.Tensor:
        """Mel (1, 80, ratio·T') for ``token`` (1, T) given the prompt tokens (1, P), their mel
        (1, ratio·P, 80) and an x-vector (1, 192). The prompt goes in front and its frames are cut
        off the output. ``streaming``: chunk-M masks (official streaming; ``mask_kind`` picks any of
        the four instead); ``finalize=False``: the last P tokens serve only as look-ahead
        (T' = T - P), as for a streaming chunk. Without a ``generator`` the official fixed noise is
        used (deterministic)."""
        kind = mask_kind if mask_kind is not None else (CHUNK_M if streaming else NON_CAUSAL)
        mu, mask, spks, cond, n_prompt = self.conditions(token, prompt_token, prompt_feat, embedding, finalize, kind)
        mel = self.decoder(mu, mask, spks, cond, kind, n_timesteps, temperature, generator, cfg_rate)
        return mel[:, :, n_prompt:]

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "CausalMaskedDiffWithXvec":
        """A flow trained by :func:`train_flow` (``minicosy.train`` checkpoint), in eval mode."""
        return model_from_checkpoint(path, lambda mc: cls(
            FlowConfig(**{**mc, "prompt_mask_ratio": tuple(mc["prompt_mask_ratio"])})))


@dataclass
class PromptState:
    """The estimator caches of a prompt's leading chunks, which no generated token can reach (the
    encoder's chunk mask and its 3-token look-ahead end inside the prompt), for each ODE step; made
    once per prompt by :func:`prompt_state` and shared read-only by every request using it."""

    frames: int
    caches: list[dict]
    mask_kind: int
    n_timesteps: int


@torch.inference_mode()
def prompt_state(flow: CausalMaskedDiffWithXvec, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, mask_kind: int = CHUNK_M, n_timesteps: int | None = None) -> PromptState:
    """Run the incremental estimator over the prompt's first k tokens, k the largest multiple of the
    mask's chunk with k + P <= prompt length (official fixed noise, default temperature and CFG)."""
    n_timesteps = n_timesteps or flow.cfg.n_timesteps
    chunk = chunk_size_of(mask_kind, flow.cfg.static_chunk_tokens)
    if chunk == 0:
        raise ValueError("a prompt state needs a causal mask kind (chunk or full-causal)")
    k = max(0, (prompt_token.shape[1] - flow.cfg.pre_lookahead_len) // chunk * chunk)
    caches: list[dict] = [{} for _ in range(n_timesteps)]
    frames = flow.cfg.token_mel_ratio * k
    if frames:
        none = prompt_token[:, :0]
        mu, mask, spks, cond, _ = flow.conditions(none, prompt_token, prompt_feat, embedding, True, mask_kind)
        flow.decoder.sample_path(mu[:, :, :frames], mask[:, :, :frames], spks, cond[:, :, :frames], mask_kind,
                                 n_timesteps, caches=caches)
    return PromptState(frames, caches, mask_kind, n_timesteps)


class FlowStreamer:
    """Streaming token-to-mel for one request (NOTES.md §3), fed with the tokens known so far.

    The first chunk waits for ``hop + pad + P`` tokens, ``pad`` putting prompt + first hop on the
    chunk grid; each chunk yields the mel of ``hop`` new tokens (the P after them are look-ahead
    only) and the hop then grows ×``scale`` up to ``max_hop``; :meth:`finish` yields the rest.

    * ``incremental=False`` (official): every chunk re-runs the flow over the prompt and all
      tokens so far with ``mask_kind`` and keeps the new frames (quadratic work); the last call
      runs non-causally over everything.
    * ``incremental=True``: the estimator runs on the new frames only, reusing each ODE step's
      cached keys/values and causal-conv tails of earlier frames, which chunk masks make
      independent of later ones; the encoder (2-3 % of the flow's time) is re-run. The last call
      keeps the chunk mask. Non-final chunks equal the recompute path's (tests/test_flow_training.py).

    All state (offset, hop, caches) lives on this object: one per request. The incremental caches
    trade memory for compute: keys/values of every attention block for every ODE step and both CFG
    rows (the conditional and unconditional velocity of eq. 10 are one batch of 2, as officially), in
    the flow's compute dtype; they grow by :meth:`bytes_per_frame` per mel frame (4,587,520 B for the
    full-size model in float32, 230 MB per second of audio; half that in bfloat16/float16) plus the
    causal-conv tails, a constant. :meth:`cache_bytes` is what they hold."""

    def __init__(self, flow: CausalMaskedDiffWithXvec, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, hop: int = 25, max_hop: int = 100, scale: int = 2,
                 incremental: bool = False, mask_kind: int = CHUNK_M, n_timesteps: int | None = None,
                 state: PromptState | None = None, **solver) -> None:
        if hop <= 0 or max_hop < hop or scale < 1:
            raise ValueError(f"need 0 < hop <= max_hop and scale >= 1, got hop={hop}, max_hop={max_hop}, scale={scale}")
        if incremental and mask_kind == NON_CAUSAL:
            raise ValueError("incremental streaming needs a causal mask kind (chunk or full-causal)")
        self.flow, self.prompt_token, self.prompt_feat, self.embedding = flow, prompt_token, prompt_feat, embedding
        self.hop, self.max_hop, self.scale, self.mask_kind = hop, max_hop, scale, mask_kind
        self.incremental, self.solver = incremental, solver
        self.n_timesteps = n_timesteps or flow.cfg.n_timesteps
        self.pad = math.ceil(prompt_token.shape[1] / hop) * hop - prompt_token.shape[1]
        self.offset = 0          # generated tokens already turned into mel
        self.frames = 0          # frames (prompt included) already through the incremental estimator
        self.caches = [{} for _ in range(self.n_timesteps)]
        if state is not None:    # start after the prompt's cached chunks (copies: the state stays shared)
            if not incremental or solver or state.mask_kind != mask_kind \
                    or state.n_timesteps != self.n_timesteps:
                raise ValueError("a prompt state needs incremental=True with its mask kind and step count, "
                                 "the fixed noise and default solver options")
            self.frames, self.caches = state.frames, [dict(c) for c in state.caches]

    def cache_bytes(self) -> int:
        """Memory held by the incremental caches."""
        tensors = [t for c in self.caches for v in c.values() for t in (v if isinstance(v, tuple) else (v,))]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_frame(self) -> int:
        """Incremental cache bytes per mel frame: the key and value rows of every attention block of
        the estimator, for each ODE step and both CFG rows, in the flow's dtype."""
        width = sum(m.to_k.out_features + m.to_v.out_features
                    for m in self.flow.decoder.estimator.modules() if isinstance(m, Attention))
        return width * self.n_timesteps * 2 * self.flow.encoder_proj.weight.element_size()

    @property
    def this_hop(self) -> int:
        return self.hop + self.pad if self.offset == 0 else self.hop

    @property
    def needed(self) -> int:
        """Tokens that must be known before :meth:`chunk` can run."""
        return self.offset + self.this_hop + self.flow.cfg.pre_lookahead_len

    def _incremental(self, token: torch.Tensor, finalize: bool) -> torch.Tensor:
        flow = self.flow
        mu, mask, spks, cond, n_prompt = flow.conditions(token, self.prompt_token, self.prompt_feat, self.embedding,
                                                         finalize, self.mask_kind)
        start = self.frames
        mel = flow.decoder.sample_path(mu[:, :, start:], mask[:, :, start:], spks, cond[:, :, start:], self.mask_kind,
                                       self.n_timesteps, caches=self.caches, offset=start, **self.solver)[-1]
        self.frames = mu.shape[2]
        return mel[:, :, max(n_prompt - start, 0):]

    def chunk(self, token: torch.Tensor) -> torch.Tensor:
        """Mel (1, 80, ratio·hop) of the next hop; ``token`` (1, ≥ :attr:`needed`) are all tokens so far."""
        if token.shape[1] < self.needed:
            raise ValueError(f"chunk needs {self.needed} tokens, got {token.shape[1]}")
        token = token[:, :self.needed]
        if self.incremental:
            mel = self._incremental(token, finalize=False)
        else:
            mel = self.flow.inference(token, self.prompt_token, self.prompt_feat, self.embedding, finalize=False,
                                      mask_kind=self.mask_kind, n_timesteps=self.n_timesteps,
                                      **self.solver)[:, :, self.flow.cfg.token_mel_ratio * self.offset:]
        self.offset += self.this_hop
        self.hop = min(self.max_hop, self.hop * self.scale)
        return mel

    def finish(self, token: torch.Tensor) -> torch.Tensor:
        """Mel of the tokens after the last chunk; ``token`` (1, T) are all the request's tokens."""
        if token.shape[1] < self.offset:
            raise ValueError(f"finish got {token.shape[1]} tokens, fewer than the {self.offset} already streamed")
        if token.shape[1] == self.offset:
            return self.prompt_feat.new_zeros(1, self.flow.cfg.n_mels, 0)
        if self.incremental:
            return self._incremental(token, finalize=True)
        mel = self.flow.inference(token, self.prompt_token, self.prompt_feat, self.embedding, finalize=True,
                                  mask_kind=NON_CAUSAL, n_timesteps=self.n_timesteps, **self.solver)
        return mel[:, :, self.flow.cfg.token_mel_ratio * self.offset:]


def stream_inference(flow: CausalMaskedDiffWithXvec, token: torch.Tensor, prompt_token: torch.Tensor,
                     prompt_feat: torch.Tensor, embedding: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
    """Token-to-mel streaming of tokens that are all known (the LM side simulated): the mel chunks
    of a :class:`FlowStreamer` (``kwargs``: its options), the last one from ``finish``."""
    streamer = FlowStreamer(flow, prompt_token, prompt_feat, embedding, **kwargs)
    while token.shape[1] >= streamer.needed:
        yield streamer.chunk(token)
    yield streamer.finish(token)


def load_flow_state_dict(model: CausalMaskedDiffWithXvec,
                         path_or_state_dict: str | Path | dict[str, torch.Tensor]) -> None:
    """Strictly load an official ``flow.pt`` (path or state dict, no renaming; NOTES.md §1); on a
    mismatch raise a ValueError naming missing keys, unexpected keys and shape conflicts."""
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"flow checkpoint not found: {path}")
        state = read_torch_file(path)
    load_state_dict_checked(model, state, "flow checkpoint (check the FlowConfig sizes)")


# ---- training on the corpus (§2.4) -------------------------------------------------------------
def flow_mels(corpus_root: str | Path, split: str) -> dict[str, torch.Tensor]:
    """The flow's 24 kHz mels (80, frames) float16 of a split's utterances, cached under ``<corpus>/cache``."""
    return feature_cache(corpus_root, f"flow_mel_{split}", load_manifest(corpus_root, split),
                         lambda r: mel_spectrogram(load_wav(Path(corpus_root) / r["path"], 24000)[0]).half())


def speaker_embeddings(corpus_root: str | Path, checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """CAM++ x-vectors (192,) of every corpus utterance by a trained checkpoint (the official
    training conditions on each utterance's own embedding), cached per checkpoint (:func:`~minicosy.data.checkpoint_cache`)."""
    from .campplus import CAMPPlus   # a declared component dependency (tests/test_packaging.py)

    records = load_manifest(corpus_root)

    def compute(only: set[str] | None) -> dict[str, torch.Tensor]:
        model = CAMPPlus.from_checkpoint(checkpoint)
        return {r["id"]: model.embed(*load_wav(Path(corpus_root) / r["path"]))[0] for r in records
                if only is None or r["id"] in only}

    return checkpoint_cache(corpus_root, checkpoint, "xvectors", compute, [r["id"] for r in records])


def load_flow_data(corpus_root: str | Path, splits: tuple[str, ...], tokenizer: str | Path,
                   speaker_model: str | Path, token_mel_ratio: int = 2) -> list[dict]:
    """Utterances of ``splits`` with their speech tokens (T,), mel (ratio·T, 80) and x-vector (192,).
    Token and mel lengths are cut to agree, as the official data pipeline does."""
    from .speech_tokenizer import corpus_tokens   # a declared component dependency

    tokens = corpus_tokens(corpus_root, tokenizer)
    xvectors = speaker_embeddings(corpus_root, speaker_model)
    items = []
    for split in splits:
        mels = flow_mels(corpus_root, split)
        for r in load_manifest(corpus_root, split):
            mel, tok = mels[r["id"]], tokens[r["id"]].long()
            n = min(len(tok), mel.shape[1] // token_mel_ratio)
            items.append({"id": r["id"], "speaker": r["speaker"], "lang": r["lang"], "split": split,
                          "token": tok[:n], "mel": mel[:, :token_mel_ratio * n].T, "xvector": xvectors[r["id"]]})
    return items


@torch.inference_mode()
def gta_mels(corpus_root: str | Path, flow_checkpoint: str | Path, tokenizer: str | Path,
             speaker_model: str | Path, split: str = "train", max_prompt_tokens: int = 100) -> dict[str, torch.Tensor]:
    """Ground-truth-aligned flow mels (80, ratio·T) float16 of a split: each utterance's own speech
    tokens through the flow as at zero-shot inference (the next utterance of the same voice as
    prompt, cut to ``max_prompt_tokens``, with its x-vector; the official fixed noise), so that the
    mel lines up frame by frame with the recording. A vocoder fine-tuned on them learns the flow's
    output rather than only clean mels (``train hift --gta-flow``; HiFi-GAN §4.4). Cached per
    flow checkpoint."""
    from tqdm.auto import tqdm

    def compute(_: set[str] | None) -> dict[str, torch.Tensor]:
        flow = CausalMaskedDiffWithXvec.from_checkpoint(flow_checkpoint)
        ratio = flow.cfg.token_mel_ratio
        items = load_flow_data(corpus_root, (split,), tokenizer, speaker_model, ratio)
        by_voice: dict[str, list[dict]] = {}
        for it in items:
            by_voice.setdefault(it["speaker"], []).append(it)
        mels, bar = {}, tqdm(total=len(items), desc=f"GTA mels ({split})")
        for own in by_voice.values():
            for k, it in enumerate(own):
                prompt = own[(k + 1) % len(own)]
                n = min(len(prompt["token"]), max_prompt_tokens)
                mel = flow.inference(it["token"][None], prompt["token"][None, :n],
                                     prompt["mel"][None, :ratio * n].float(), prompt["xvector"][None].float())
                mels[it["id"]] = mel[0].half()
                bar.update(1)
        bar.close()
        return mels

    return checkpoint_cache(corpus_root, flow_checkpoint, f"gta_mel_{split}", compute)


def collate(items: list[dict], max_tokens: int = 0, rng: np.random.Generator | None = None,
            token_mel_ratio: int = 2) -> dict[str, torch.Tensor]:
    """A padded batch: token (B, T) padded with -1, token_len (B,), feat (B, ratio·T, 80), embedding
    (B, 192). With ``max_tokens`` > 0 longer items are cut to a window of that many tokens, at a
    random start (``rng``) or at the beginning."""
    windows = []
    for it in items:
        n = len(it["token"])
        keep = min(n, max_tokens) if max_tokens > 0 else n
        start = int(rng.integers(n - keep + 1)) if rng is not None else 0
        windows.append((it, start, keep))
    longest = max(keep for _, _, keep in windows)
    token = torch.full((len(items), longest), -1, dtype=torch.long)
    feat = torch.zeros(len(items), token_mel_ratio * longest, items[0]["mel"].shape[1])
    for i, (it, start, keep) in enumerate(windows):
        token[i, :keep] = it["token"][start:start + keep]
        feat[i, :token_mel_ratio * keep] = it["mel"][token_mel_ratio * start: token_mel_ratio * (start + keep)].float()
    return {"token": token, "token_len": torch.tensor([keep for _, _, keep in windows]), "feat": feat,
            "embedding": torch.stack([it["xvector"] for it in items]).float()}


def random_batches(items: list[dict], batch_size: int, max_tokens: int, rng: np.random.Generator
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of ``batch_size`` random utterances, each cut to a random ``max_tokens`` window."""
    while True:
        order = rng.permutation(len(items))
        for k in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([items[i] for i in order[k:k + batch_size]], max_tokens, rng)


@torch.inference_mode()
def heldout_mel_l1(flow: CausalMaskedDiffWithXvec, items: list[dict], mask_kind: int, prompt_share: float = 0.3,
                   max_tokens: int = 150, batch_size: int = 16, seed: int = 0, **solver) -> float:
    """Mel L1 of synthesis: the first ``prompt_share`` of each utterance's tokens is the prompt
    (X̃_1 = its real mel), the rest is generated by the CFG Euler solver under ``mask_kind``
    (encoder and UNet; ``solver``: ``sample_path`` options); mean |X_1 - mel| over the generated
    frames and the 80 bins. Utterances are cut to their first ``max_tokens`` tokens (6 s)."""
    flow.eval()
    ratio, g = flow.cfg.token_mel_ratio, torch.Generator().manual_seed(seed)
    total, count = 0.0, 0.0
    for k in range(0, len(items), batch_size):
        b = collate(items[k:k + batch_size], max_tokens)
        mu, mask = flow.encode(flow.embed_tokens(b["token"], b["token_len"]), b["token_len"], mask_kind=mask_kind)
        target = b["feat"].transpose(1, 2)
        prompt = ratio * (b["token_len"] * prompt_share).floor().view(-1, 1, 1)
        is_prompt = (torch.arange(target.shape[2]).view(1, 1, -1) < prompt).to(target)
        mel = flow.decoder.sample_path(mu, mask, flow.speaker(b["embedding"]), target * is_prompt, mask_kind,
                                       generator=g, **solver)[-1]
        generated = mask * (1 - is_prompt)
        total += float(((mel - target).abs() * generated).sum())
        count += float(generated.sum()) * target.shape[1]
    return total / count


def eval_subset(items: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` of ``items`` drawn without replacement (fixed by ``seed``), in their original order."""
    pick = np.random.default_rng(seed).choice(len(items), min(n, len(items)), replace=False)
    return [items[i] for i in sorted(pick)]


def evaluate_masks(flow: CausalMaskedDiffWithXvec, items: list[dict], **kwargs) -> dict[str, float]:
    """:func:`heldout_mel_l1` under each of the four masks, keyed by ``MASK_NAMES``."""
    return {name: round(heldout_mel_l1(flow, items, kind, **kwargs), 4) for kind, name in enumerate(MASK_NAMES)}


def warm_start(flow: CausalMaskedDiffWithXvec, checkpoint: str | Path) -> bool:
    """Load a flow checkpoint's weights into ``flow`` (``train flow --init``). A flow of another
    codebook (trained on a retrained tokenizer's tokens) warm-starts all but the token embedding,
    which keeps ``flow``'s own initialisation; returns whether that happened. Any other mismatch
    is a ``ValueError`` naming it."""
    state, own = load_checkpoint(checkpoint)["state_dict"], flow.state_dict()
    key = "input_embedding.weight"
    fresh = key in state and state[key].shape != own[key].shape and state[key].shape[1:] == own[key].shape[1:]
    load_state_dict_checked(flow, {**state, key: own[key]} if fresh else state, f"flow checkpoint {checkpoint} (--init)")
    if fresh:
        print(f"--init {checkpoint}: another codebook ({state[key].shape[0]} codes, now {own[key].shape[0]}): "
              "the token embedding starts afresh")
    return fresh


def train_flow(corpus_root: str | Path = "data/corpus", preset: str = "tiny", recipe: str = "paper",
               minutes: float = 8.0, out: str | Path | None = None,
               tokenizer: str | Path = "data/checkpoints/speech_tokenizer_fsq.pt",
               speaker_model: str | Path = "data/checkpoints/campplus_tiny.pt", batch_size: int = 12,
               max_tokens: int = 100, eval_utterances: int = 16, seed: int = 0,
               threads: int = 2, device: str = "cpu", init: str | Path | None = None, state_path: str | None = None
               ) -> tuple[CausalMaskedDiffWithXvec, dict]:
    """Train the flow on the corpus' train split with ``recipe`` ("paper" or "official", see the
    module docstring), from scratch or from the weights of the flow checkpoint ``init`` (same
    sizes; with another codebook, all but the token embedding); report the mel L1 per mask on dev + test sentences and on the held-out voices; save."""
    seed_everything(seed)
    from .speech_tokenizer import SpeechTokenizer   # the speech vocabulary is the tokenizer's codebook

    codes = SpeechTokenizer.from_checkpoint(tokenizer).codebook_size
    cfg = replace(get_config(preset).flow, training_recipe=recipe, vocab_size=codes)
    data = {name: load_flow_data(corpus_root, splits, tokenizer, speaker_model, cfg.token_mel_ratio)
            for name, splits in (("train", ("train",)), ("dev_test", ("dev", "test")), ("heldout", ("heldout",)))}
    flow = CausalMaskedDiffWithXvec(cfg)
    if init is not None:
        warm_start(flow, init)
    tcfg = TrainConfig(lr=1e-3, warmup_steps=100, max_minutes=minutes, seed=seed, threads=threads,
                       batch_seconds=batch_size * max_tokens / 25, device=device, state_path=state_path)
    g = torch.Generator().manual_seed(seed)
    batches = random_batches(data["train"], batch_size, max_tokens, np.random.default_rng(seed))
    log = train_loop(flow, batches, lambda b: flow(b["token"], b["token_len"], b["feat"], b["embedding"], g)["loss"],
                     tcfg, desc=f"flow ({recipe})")
    metrics = {name: evaluate_masks(flow, eval_subset(data[name], eval_utterances, seed))
               for name in ("dev_test", "heldout")}
    metrics.update(eval_utterances=eval_utterances, train_seconds=log.seconds)
    for name in ("dev_test", "heldout"):
        print(f"mel L1 ({name}, {eval_utterances} utterances <= 6 s, first 30% as prompt): "
              + ", ".join(f"{k} {v:.3f}" for k, v in metrics[name].items()))
    if out is not None:
        inputs = {"speech_tokenizer": str(tokenizer), "speaker_model": str(speaker_model)}
        save_checkpoint(out, flow, asdict(cfg), tcfg, log, metrics=metrics,
                        inputs=inputs if init is None else {**inputs, "init": str(init)})
    return flow, metrics


def train_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train flow [--recipe paper|official] [--minutes 8] [--out PATH]``."""
    p = recipe_parser("flow", 8.0, "data/checkpoints/flow_tiny.pt", device=True)
    p.add_argument("--recipe", choices=["paper", "official"], default="paper")
    p.add_argument("--tokenizer", default="data/checkpoints/speech_tokenizer_fsq.pt")
    p.add_argument("--speaker-model", default="data/checkpoints/campplus_tiny.pt")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=100, help="training window (tokens) cut from each utterance")
    p.add_argument("--init", help="start from this flow checkpoint's weights (fine-tuning) instead of at random")
    a = p.parse_args(argv)
    train_flow(a.corpus, recipe=a.recipe, minutes=a.minutes, out=a.out, tokenizer=a.tokenizer,
               speaker_model=a.speaker_model, batch_size=a.batch_size, max_tokens=a.max_tokens, seed=a.seed,
               threads=a.threads, device=a.device, init=a.init, state_path=state_file(a.state, a.out))
