"""An alignment aid for a small text-speech LM: a CTC loss that reads the text back from the LM.

A tiny-scale departure from the paper (``LMConfig.align_ctc_weight``; 0, the paper's recipe, turns
it off). CosyVoice 2's LM (§2.3) is a plain decoder: nothing tells it which text unit each speech
token says, so it must discover the text-to-speech alignment from the next-token loss alone. At
full scale it does; at small scale that is what fails first (its speech skips and rushes through
units). The aid gives the alignment a direct gradient during training only: a linear head reads,
from the LM's last hidden state at every speech-token row, which text unit is being spoken, and a
CTC loss (Graves et al., 2006) over those rows asks that the sequence of units read that way is
the utterance's text, in order, however long each unit lasts. Inference never calls the head, so
decoding, streaming and the official layout of the other weights are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentHead(nn.Module):
    """Linear H -> text vocabulary + 1 (the last class is CTC's blank) on speech-row hidden states."""

    def __init__(self, hidden_size: int, text_vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, text_vocab_size + 1)

    def loss(self, hidden: torch.Tensor, speech_rows: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
        """Mean CTC loss per text id: ``hidden`` (B, L, H) LM states, ``speech_rows`` (B, L) bool,
        True where the input row is a speech token, ``texts`` the B utterances' text ids. An
        utterance with fewer speech rows than CTC needs contributes zero (``zero_infinity``)."""
        blank = self.proj.out_features - 1
        logp = self.proj(hidden).float().log_softmax(-1)                   # (B, L, V+1)
        lengths = speech_rows.sum(1)
        rows = logp.new_zeros(logp.size(0), int(lengths.max()), logp.size(2))
        for i in range(logp.size(0)):                                     # speech rows first, in order
            rows[i, :int(lengths[i])] = logp[i, speech_rows[i]]
        targets = torch.cat([t.to(logp.device) for t in texts])
        target_lengths = torch.tensor([len(t) for t in texts], device=logp.device)
        return F.ctc_loss(rows.transpose(0, 1), targets, lengths, target_lengths, blank=blank,
                          reduction="mean", zero_infinity=True)
