"""Finite scalar quantisation (§2.2, eqs. 1, 2, 14) and the VQ baseline it is compared with (Table 4).

FSQ projects H down to D dimensions, bounds each to [-K, K] and rounds it (eq. 1); the code of a
frame is its digit vector read in base 2K+1 (eq. 2); eq. 14 reads the digits back from a code so
that Proj_up can rebuild Ĥ from a token alone. The rounding passes gradients straight through.

Usage::

    fsq = FSQ(dim=256, levels=1, code_dim=8)      # 3**8 = 6561 codes
    h_hat, codes, _ = fsq(h)                      # h: (B, T, 256) -> (B, T, 256), (B, T)
    fsq.decode(codes)                             # == h_hat, from the tokens alone
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def bounded_round(x: torch.Tensor, levels: int) -> torch.Tensor:
    """ROUND of eq. 1: squash to (-K, K) with K·tanh, round to the integers -K..K, and let the
    gradient pass straight through the rounding (the factor 0.999 keeps |x| < K + 1/2 as the
    official tokenizer does)."""
    bounded = levels * 0.999 * torch.tanh(x)
    return bounded + (torch.round(bounded) - bounded).detach()


def digits_to_codes(digits: torch.Tensor, levels: int) -> torch.Tensor:
    """Eq. 2: μ = Σ_j h̄_j (2K+1)^j with h̄ = h̃ + K ∈ {0..2K}; digits (..., D) in [-K, K]."""
    base = 2 * levels + 1
    weights = base ** torch.arange(digits.shape[-1], device=digits.device)
    return ((digits.round().long() + levels) * weights).sum(-1)


def codes_to_digits(codes: torch.Tensor, levels: int, dim: int) -> torch.Tensor:
    """Eq. 14: h̄_j = ⌊μ / (2K+1)^j⌋ mod (2K+1), returned centred in [-K, K] as floats."""
    base = 2 * levels + 1
    powers = base ** torch.arange(dim, device=codes.device)
    return ((codes.long().unsqueeze(-1) // powers) % base - levels).float()


class FSQ(nn.Module):
    """Proj_down → bounded round → Proj_up, with codes in [0, (2K+1)^D)."""

    def __init__(self, dim: int, levels: int = 1, code_dim: int = 8):
        super().__init__()
        self.levels, self.code_dim = levels, code_dim
        self.codebook_size = (2 * levels + 1) ** code_dim
        self.proj_down = nn.Linear(dim, code_dim)
        self.proj_up = nn.Linear(code_dim, dim)

    def quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H̃ = ROUND(Proj_down(H)) (eq. 1) and the codes μ (eq. 2)."""
        digits = bounded_round(self.proj_down(h), self.levels)
        return digits, digits_to_codes(digits.detach(), self.levels)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ĥ, codes, auxiliary loss = 0): FSQ needs no codebook loss."""
        digits, codes = self.quantize(h)
        return self.proj_up(digits), codes, h.new_zeros(())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Ĥ = Proj_up(digits(μ)) (eqs. 14-15): a token sequence back to the encoder's space."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return self.proj_up(codes_to_digits(codes, self.levels, self.code_dim))

    def decode_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Ĥ for a *distribution* over codes (..., codebook_size), e.g. a Gumbel-softmax sample of
        the LM's logits (§2.8): the expected digit vector, then Proj_up. Differentiable in probs."""
        table = codes_to_digits(torch.arange(self.codebook_size, device=probs.device), self.levels, self.code_dim)
        return self.proj_up(probs @ table)


class VectorQuantizer(nn.Module):
    """The VQ baseline of Table 4: nearest of ``codebook_size`` learned vectors in a low-rank space,
    straight-through gradients, codebook + β·commitment loss (no restarts or EMA: plain VQ)."""

    def __init__(self, dim: int, codebook_size: int = 4096, code_dim: int = 8, beta: float = 0.25):
        super().__init__()
        self.codebook_size, self.beta = codebook_size, beta
        self.proj_down = nn.Linear(dim, code_dim)
        self.proj_up = nn.Linear(code_dim, dim)
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ĥ, codes, codebook + β·commitment loss)."""
        z = self.proj_down(h)
        codes = torch.cdist(z.reshape(-1, z.shape[-1]), self.codebook.weight).argmin(-1).view(z.shape[:-1])
        q = self.codebook(codes)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        return self.proj_up(z + (q - z).detach()), codes, loss

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.proj_up(self.codebook(codes))
