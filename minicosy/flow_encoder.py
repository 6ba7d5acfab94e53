"""The flow's token encoder: look-ahead conv, causal Transformer blocks, x2 up-sampling (§2.4; NOTES.md §4).

Speech tokens (25 Hz) become the frame-level condition μ (50 Hz) of the flow-matching UNet:

    tokens --embed--> LinearEmbed (+ESPnet rel. positions) --> PreLookaheadLayer (sees P future tokens)
           --> N conformer blocks (rel-pos MHSA + FFN, chunk masks of M tokens)
           --> Upsample1D (nearest x2, causal conv) --> LinearEmbed --> 4 blocks (chunk masks of 2M frames)
           --> after_norm                                   (the flow then applies encoder_proj -> 80)

The blocks are ESPnet/WeNet pre-norm conformer layers without convolution module and without macaron
FFN. Attention is masked per sample by one of the paper's four masks (``minicosy.masks``); the
official streaming mode is ``CHUNK_M`` (25 tokens, 50 frames). Module names follow the official
state dict (``encoder.*`` keys of ``flow.pt``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FlowConfig
from .masks import NON_CAUSAL, batch_chunk_mask, make_pad_mask


def rel_positional_encoding(size: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
    """ESPnet relative positional encoding (1, 2·size-1, d): row k encodes the relative position
    size-1-k (from +(size-1) down to -(size-1)); sin on even, cos on odd channels."""
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
                         * -(math.log(10000.0) / d_model))
    rel = torch.arange(size - 1, -size, -1, dtype=torch.float32, device=device).unsqueeze(1)
    pe = torch.zeros(2 * size - 1, d_model, device=device)
    pe[:, 0::2] = torch.sin(rel * div_term)
    pe[:, 1::2] = torch.cos(rel * div_term)
    return pe.unsqueeze(0)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm + dropout, then x·√d and the relative position table (``embed``/``up_embed``)."""

    def __init__(self, idim: int, odim: int, dropout: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)
        self.odim = odim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * math.sqrt(self.odim)
        pos_emb = rel_positional_encoding(x.shape[1], self.odim, x.device).to(x.dtype)
        return self.dropout(x), self.dropout(pos_emb)


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (ESPnet ``rel_selfattn``):
    score(i, j) = ((q_i + u)·k_j + (q_i + v)·W_pos p_{i-j}) / √d_k."""

    def __init__(self, n_head: int, n_feat: int, dropout: float):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"encoder_size {n_feat} is not divisible by encoder_heads {n_head}")
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), mask (B, T, T) bool, pos_emb (1, 2T-1, D) -> (B, T, D)."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)   # (1, H, 2T-1, d_k)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        # relative shift: query i and key j use the table row of relative position i - j
        rows = torch.arange(t, device=x.device)
        index = (t - 1 - rows.unsqueeze(1) + rows.unsqueeze(0)).expand(b, self.h, t, t)
        position = position.expand(b, -1, -1, -1).gather(-1, index)
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~mask.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(self.dropout(attn), v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    """Linear -> swish -> dropout -> Linear."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(F.silu(self.w_1(x))))


class ConformerBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + FFN(LN(x)) (no conv module, no macaron)."""

    def __init__(self, size: int, heads: int, linear_units: int, dropout: float):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, size, dropout)
        self.feed_forward = PositionwiseFeedForward(size, linear_units, dropout)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm_mha(x), mask, pos_emb))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))


class PreLookaheadLayer(nn.Module):
    """§2.4's look-ahead: right-pad P, conv k=P+1, leaky ReLU, left-pad 2, conv k=3, residual.
    Each output token sees itself and the next P tokens; ``context`` supplies those real future
    tokens at the end of a streaming chunk instead of zero padding."""

    def __init__(self, channels: int, hidden: int, pre_lookahead_len: int):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, hidden, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(hidden, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C), context (B, <=P, C) or None -> (B, T, C)."""
        ahead = x.new_zeros(x.shape[0], 0, x.shape[2]) if context is None else context
        if ahead.shape[1] > self.pre_lookahead_len:
            raise ValueError(f"context has {ahead.shape[1]} frames, at most pre_lookahead_len="
                             f"{self.pre_lookahead_len} are used")
        out = torch.cat([x, ahead], dim=1).transpose(1, 2)
        out = F.pad(out, (0, self.pre_lookahead_len - ahead.shape[1]))
        out = F.leaky_relu(self.conv1(out), 0.01)
        out = self.conv2(F.pad(out, (self.conv2.kernel_size[0] - 1, 0)))
        return out.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest-neighbour up-sampling by ``stride`` followed by a causal conv of kernel 2·stride+1."""

    def __init__(self, channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, 2 * stride + 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, T), lengths (B,) -> (B, C', stride·T), stride·lengths."""
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(x, (2 * self.stride, 0))), lengths * self.stride


class UpsampleConformerEncoder(nn.Module):
    """Token encoder of the flow (official ``UpsampleConformerEncoder`` with rel_pos_espnet)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        d, drop = cfg.encoder_size, cfg.encoder_dropout
        self.chunk_tokens = cfg.static_chunk_tokens
        self.embed = LinearEmbed(cfg.input_size, d, drop)
        self.pre_lookahead_layer = PreLookaheadLayer(d, cfg.pre_lookahead_channels, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerBlock(d, cfg.encoder_heads, cfg.encoder_linear_units, drop)
                                      for _ in range(cfg.encoder_blocks))
        self.up_layer = Upsample1D(d, cfg.upsample_channels, cfg.token_mel_ratio)
        self.up_embed = LinearEmbed(cfg.upsample_channels, d, drop)
        self.up_encoders = nn.ModuleList(ConformerBlock(d, cfg.encoder_heads, cfg.encoder_linear_units, drop)
                                         for _ in range(cfg.up_encoder_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, context: torch.Tensor | None = None,
                mask_kind: int | torch.Tensor = NON_CAUSAL) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings xs (B, T, input_size) with lengths (B,) -> frames (B, ratio·T, D) and
        their padding mask (B, 1, ratio·T). ``context`` (B, <=P, input_size): embeddings of the next
        tokens, used only as look-ahead. ``mask_kind``: one of ``minicosy.masks`` kinds, per batch
        or per sample; ``CHUNK_M`` is the official streaming mode."""
        pad = ~make_pad_mask(xs_lens, xs.shape[1]).unsqueeze(1)
        xs, pos_emb = self.embed(xs)
        if context is not None:
            context = self.embed(context)[0]
        xs = self.pre_lookahead_layer(xs, context)
        mask = batch_chunk_mask(pad, mask_kind, self.chunk_tokens)
        for layer in self.encoders:
            xs = layer(xs, mask, pos_emb)

        xs, xs_lens = self.up_layer(xs.transpose(1, 2), xs_lens)
        # contiguous as officially: up_embed's Linear then sums in the official order (bit-exact)
        xs = xs.transpose(1, 2).contiguous()
        pad = ~make_pad_mask(xs_lens, xs.shape[1]).unsqueeze(1)
        xs, pos_emb = self.up_embed(xs)
        mask = batch_chunk_mask(pad, mask_kind, self.chunk_tokens * self.up_layer.stride)
        for layer in self.up_encoders:
            xs = layer(xs, mask, pos_emb)
        return self.after_norm(xs), pad
