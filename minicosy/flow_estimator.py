"""The flow's vector-field estimator: a causal convolutional Transformer UNet (§2.4 eq. 7; NOTES.md §4).

UNet_θ(X_t, t; v, μ, X̃_1) predicts the velocity of the OT path from the channel concat
[X_t, μ, v broadcast over time, X̃_1] (4 x 80 = 320 channels):

    t --sinusoid(t·1000)--> time_mlp ----------------------------------------+ (added in every resnet)
    [x, mu, spks, cond] --> down: resnet + n Transformer blocks + causal conv   (skip saved)
                        --> mid (x num_mid): resnet + n Transformer blocks
                        --> up: concat skip, resnet + n Transformer blocks + causal conv
                        --> final causal block --> 1x1 conv --> 80, x mask

Like the official ``CausalConditionalDecoder`` with one level (channels = [256]) nothing is
down-sampled. All convolutions are causal (left padding k-1), so with a chunk attention mask
the whole UNet is causal at chunk granularity. Names follow the official state dict
(``decoder.estimator.*`` keys; diffusers-style Transformer blocks).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FlowConfig
from .masks import NON_CAUSAL, batch_chunk_mask, mask_to_bias

Cache = dict  # per-module state of incremental streaming: {module: tensor or (keys, values)}


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) timesteps in [0, 1] -> (B, dim): [sin(scale·t·ω_i), cos(scale·t·ω_i)], ω_i = 10000^(-i/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = scale * t.reshape(-1, 1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CausalConv1d(nn.Conv1d):
    """Conv1d that sees only the present and the past: left zero padding of kernel_size-1.
    With a ``cache`` (incremental streaming) the left context is the previous call's last
    kernel_size-1 input frames instead of zeros, and the cache keeps this call's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        left = self.kernel_size[0] - 1
        if cache is None:
            return super().forward(F.pad(x, (left, 0)))
        past = cache.get(self)
        x = torch.cat([x.new_zeros(*x.shape[:2], left) if past is None else past, x], dim=2)
        cache[self] = x[:, :, -left:]
        return super().forward(x)


class Transpose(nn.Module):
    """Swap time and channels, so that LayerNorm normalises over channels inside a Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalBlock1D(nn.Module):
    """Causal conv k3 -> LayerNorm over channels -> Mish, masked before and after."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), Transpose(), nn.LayerNorm(dim_out),
                                   Transpose(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        conv, *rest = self.block
        h = conv(x * mask, cache)
        for layer in rest:
            h = layer(h)
        return h * mask


class CausalResnetBlock1D(nn.Module):
    """block1 -> + Linear(Mish(time embedding)) -> block2, plus a 1x1-conv residual."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        h = self.block1(x, mask, cache) + self.mlp(time_emb).unsqueeze(-1)
        return self.block2(h, mask, cache) + self.res_conv(x * mask)


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias (B, T, T); no q/k/v biases. With a ``cache``
    the new frames' keys/values are appended to the cached ones (bias then (B, T_new, T_all))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        if cache is not None:
            if self in cache:
                k, v = torch.cat([cache[self][0], k], dim=2), torch.cat([cache[self][1], v], dim=2)
            cache[self] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(1))
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELUProj(nn.Module):
    """Linear followed by exact GELU (the first layer of the feed-forward)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """GELU MLP with 4x expansion; slot 1 is the (p = 0) dropout of the official layout."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias, cache)
        return x + self.ff(self.norm3(x))


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConditionalDecoder(nn.Module):
    """The UNet of eq. 7 (official ``CausalConditionalDecoder`` with a single channel level)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.in_channels = 4 * cfg.n_mels           # x, mu, spks, cond
        ch, time_dim = cfg.estimator_channels, 4 * cfg.estimator_channels
        self.chunk_frames = cfg.static_chunk_tokens * cfg.token_mel_ratio
        self.time_mlp = TimestepEmbedding(self.in_channels, time_dim)

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(ch, cfg.estimator_heads, cfg.estimator_attention_head_dim)
                                 for _ in range(cfg.estimator_n_blocks))

        self.down_blocks = nn.ModuleList([nn.ModuleList([CausalResnetBlock1D(self.in_channels, ch, time_dim),
                                                         blocks(), CausalConv1d(ch, ch, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([CausalResnetBlock1D(ch, ch, time_dim), blocks()])
                                        for _ in range(cfg.estimator_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([CausalResnetBlock1D(2 * ch, ch, time_dim),
                                                       blocks(), CausalConv1d(ch, ch, 3)])])
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, cfg.n_mels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal (ReLU gain) conv and linear weights, zero biases (as the official init)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _transformers(x: torch.Tensor, blocks: nn.ModuleList, bias: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x, bias, cache)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, mask_kind: int | torch.Tensor = NON_CAUSAL,
                cache: Cache | None = None, offset: int = 0) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T) float; t (B,); spks (B, 80) -> velocity (B, 80, T).
        ``mask_kind``: attention mask kind(s) of ``minicosy.masks``; ``CHUNK_M`` = official streaming.

        Incremental streaming: with a ``cache`` (a dict this call fills), the T frames are frames
        ``offset .. offset+T-1`` of a longer unpadded sequence whose first ``offset`` frames went
        through earlier calls with the same cache; their keys/values and causal-conv tails are
        reused. With a chunk mask and ``offset`` on the chunk grid this equals running all frames."""
        t = self.time_mlp(sinusoidal_time_embedding(t, self.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)
        if cache is None and offset:
            raise ValueError("offset > 0 needs the cache of the earlier frames")
        past = mask.new_ones(mask.shape[0], 1, offset)
        allowed = batch_chunk_mask(torch.cat([past, mask], dim=2).bool(), mask_kind, self.chunk_frames)
        bias = mask_to_bias(allowed[:, offset:], h.dtype)

        resnet, blocks, conv = self.down_blocks[0]
        skip = self._transformers(resnet(h, mask, t, cache), blocks, bias, cache)
        h = conv(skip * mask, cache)
        for resnet, blocks in self.mid_blocks:
            h = self._transformers(resnet(h, mask, t, cache), blocks, bias, cache)
        resnet, blocks, conv = self.up_blocks[0]
        h = self._transformers(resnet(torch.cat([h, skip], dim=1), mask, t, cache), blocks, bias, cache)
        h = conv(h * mask, cache)
        return self.final_proj(self.final_block(h, mask, cache) * mask) * mask
