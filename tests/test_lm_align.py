"""The training-only alignment aid of the text-speech LM (minicosy.lm_align)."""
from dataclasses import replace

import pytest
import torch

from minicosy.config import LMConfig
from minicosy.lm import TextSpeechLM
from minicosy.lm_train import collate_lm, train_lm
from minicosy.lm_align import AlignmentHead
from minicosy.train import TrainConfig, main

from .test_lm_training import _examples

TINY = LMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, speech_token_size=50, mix_ratio=(2, 3))
AIDED = replace(TINY, align_ctc_weight=0.5)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("bistream", [False, True])
def test_the_speech_row_mask_marks_exactly_the_speech_inputs_in_order(bistream):
    torch.manual_seed(0)
    lm = TextSpeechLM(TINY, 100)
    batch = collate_lm(_examples(4))
    _, rows, lengths, speech_rows, texts = lm._batch(**batch, bistream=bistream)
    for i in range(4):
        speech = batch["speech_token"][i, :batch["speech_token_len"][i]]
        assert int(speech_rows[i].sum()) == len(speech) and not speech_rows[i, int(lengths[i]):].any()
        torch.testing.assert_close(rows[i, speech_rows[i]], lm.speech_embedding(speech))
        assert texts[i].tolist() == batch["text_token"][i, :batch["text_token_len"][i]].tolist()
    if bistream:      # interleaved: a text row follows the first speech group
        first = int(speech_rows[0].nonzero()[0])
        assert not speech_rows[0, first + TINY.mix_ratio[1]]


def test_the_aid_adds_a_weighted_ctc_loss_that_training_lowers():
    torch.manual_seed(0)
    aided = TextSpeechLM(AIDED, 100)
    plain = TextSpeechLM(TINY, 100)
    plain.load_state_dict({k: v for k, v in aided.state_dict().items() if not k.startswith("align_head.")})
    batch = collate_lm(_examples(6))
    out, ref = aided(**batch, bistream=False), plain(**batch, bistream=False)
    assert "align_ctc" not in ref and torch.isfinite(out["align_ctc"]) and out["align_ctc"] > 0
    torch.testing.assert_close(out["loss"], ref["loss"] + 0.5 * out["align_ctc"])
    opt = torch.optim.AdamW(aided.parameters(), lr=1e-2)
    first = out["align_ctc"].item()
    for _ in range(30):
        loss = aided(**batch, bistream=False)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert aided(**batch, bistream=False)["align_ctc"].item() < 0.7 * first


def test_inference_and_the_official_layout_are_unchanged_by_the_aid():
    torch.manual_seed(0)
    aided = TextSpeechLM(AIDED, 100).eval()
    plain = TextSpeechLM(TINY, 100).eval()
    weights = {k: v for k, v in aided.state_dict().items() if not k.startswith("align_head.")}
    plain.load_state_dict(weights)
    assert set(plain.state_dict()) == set(weights)                     # no head in the paper's layout
    tokens = [list(m.inference([1, 2, 3, 4], sampling="greedy", max_token_text_ratio=3)) for m in (aided, plain)]
    assert tokens[0] == tokens[1]


def test_ctc_ignores_utterances_too_short_to_say_their_text():
    head = AlignmentHead(8, 5)
    hidden = torch.randn(1, 4, 8)
    rows = torch.tensor([[False, True, True, False]])                 # 2 speech rows for 3 units
    assert head.loss(hidden, rows, [torch.tensor([1, 2, 3])]).item() == 0.0


def test_init_adds_or_drops_the_head(tmp_path):
    train, held = _examples(8), _examples(3, seed=1)
    tcfg = TrainConfig(max_steps=0, threads=1)
    train_lm(train, held, TINY, 100, tcfg, max_rows=300, out=tmp_path / "plain.pt")
    aided, _ = train_lm(train, held, AIDED, 100, tcfg, max_rows=300, out=tmp_path / "aided.pt", init=tmp_path / "plain.pt")
    assert aided.align_head is not None
    again, _ = train_lm(train, held, TINY, 100, tcfg, max_rows=300, init=tmp_path / "aided.pt")
    assert again.align_head is None
    assert TextSpeechLM.from_checkpoint(tmp_path / "aided.pt").align_head is not None


def test_the_recipe_refuses_the_aid_with_instructions(tmp_path):
    with pytest.raises(ValueError, match="--no-instruct"):
        main(["lm", "--corpus", str(tmp_path), "--align-ctc", "0.3", "--out", str(tmp_path / "lm.pt")])
