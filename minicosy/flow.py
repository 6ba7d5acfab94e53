"""Chunk-aware causal flow matching: speech tokens + prompt mel + speaker -> mel (§2.4; NOTES.md §4, §4a).

* ``CausalConditionalCFM``: the OT conditional flow (eqs. 3-6), its training loss (eq. 8) and the
  Euler ODE solver with the cosine schedule (eq. 9) and classifier-free guidance (eq. 10).
* ``CausalMaskedDiffWithXvec``: the whole flow model of Fig. 1(c) / Fig. 3 — token embedding,
  token encoder (``flow_encoder``), ``encoder_proj`` -> μ, x-vector projection, CFM with the UNet
  (``flow_estimator``). Parameter names equal the official ``flow.pt`` keys.

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
    load_flow_state_dict(flow, "flow.pt")                         # official checkpoint, strict
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FlowConfig
from .flow_encoder import UpsampleConformerEncoder
from .flow_estimator import CausalConditionalDecoder
from .masks import CHUNK_M, NON_CAUSAL, make_pad_mask, sample_training_mask

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

    def initial_noise(self, mu: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """X_0 for (B, 80, T): the official fixed noise sliced to T, or fresh N(0, I) from ``generator``."""
        b, c, t = mu.shape
        if generator is not None:
            return _draw((b, c, t), generator, mu, normal=True)
        if t > MAX_FIXED_NOISE_FRAMES:
            raise ValueError(f"{t} frames exceed the official fixed noise ({MAX_FIXED_NOISE_FRAMES} frames); "
                             "pass a torch.Generator for fresh noise")
        return fixed_noise(c)[:, :, :t].to(mu).expand(b, -1, -1)

    @torch.inference_mode()
    def forward(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                mask_kind: int | torch.Tensor = NON_CAUSAL, n_timesteps: int | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample X_1 by Euler steps on the cosine grid (eq. 9) with CFG (eq. 10): the conditional
        and the unconditional (μ, v, X̃_1 = 0) velocity come from one batch of 2B rows and mix as
        (1+β)·v_cond - β·v_uncond. mu, cond (B, 80, T); mask (B, 1, T); spks (B, 80)."""
        n_timesteps = n_timesteps or self.cfg.n_timesteps
        beta = self.cfg.cfg_rate
        x = self.initial_noise(mu, generator) * temperature
        t_span = cosine_t_span(n_timesteps, mu.device, mu.dtype)
        mask2, mu2 = torch.cat([mask, mask]), torch.cat([mu, torch.zeros_like(mu)])
        spks2, cond2 = torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, torch.zeros_like(cond)])
        kind2 = torch.cat([torch.as_tensor(mask_kind, device=mu.device).expand(mu.shape[0])] * 2)
        t, dt = t_span[:1], t_span[1] - t_span[0]
        for step in range(1, n_timesteps + 1):
            v = self.estimator(torch.cat([x, x]), mask2, mu2, t.expand(2 * x.shape[0]), spks2, cond2, kind2)
            v_cond, v_uncond = v.chunk(2)
            x = x + dt * ((1.0 + beta) * v_cond - beta * v_uncond)
            t = t + dt
            if step < n_timesteps:
                dt = t_span[step + 1] - t
        return x

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
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool = False, finalize: bool = True,
                  n_timesteps: int | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Mel (1, 80, ratio·T') for ``token`` (1, T) given the prompt tokens (1, P), their mel
        (1, ratio·P, 80) and an x-vector (1, 192). The prompt goes in front and its frames are cut
        off the output. ``streaming``: chunk-M masks (official streaming); ``finalize=False``: the
        last P tokens serve only as look-ahead (T' = T - P), as for a streaming chunk. Without a
        ``generator`` the official fixed noise is used (deterministic)."""
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
        tokens = torch.cat([prompt_token, token], dim=1).to(device)
        x = self.embed_tokens(tokens, torch.tensor([tokens.shape[1]], device=device))
        context = None
        if not finalize:
            x, context = x[:, :-look], x[:, -look:]
        kind = CHUNK_M if streaming else NON_CAUSAL
        mu, mask = self.encode(x, torch.tensor([x.shape[1]], device=x.device), context, kind)
        n_prompt = prompt_feat.shape[1]
        cond = torch.zeros_like(mu)
        cond[:, :, :n_prompt] = prompt_feat.transpose(1, 2).to(mu)
        mel = self.decoder(mu, mask, self.speaker(embedding.to(mu)), cond, kind, n_timesteps, temperature, generator)
        return mel[:, :, n_prompt:]


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
        state = torch.load(path, map_location="cpu", weights_only=True)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    conflicts = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or conflicts:
        raise ValueError("flow checkpoint does not match the model (check the FlowConfig sizes):\n"
                         f"  missing keys ({len(missing)}): {missing}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
                         f"  shape conflicts ({len(conflicts)}): {conflicts}")
    model.load_state_dict(state, strict=True)
