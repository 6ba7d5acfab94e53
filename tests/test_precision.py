"""Half precision against float32 on the same inputs (CPU, the trained tiny models): how far bfloat16
moves the LM's log-probs, the flow's mel and HiFT's waveform (the convolutions only; STFT/iSTFT stay
float32). The tolerances are about twice what was measured on the 2-core CI machine kind, at 1 and
2 threads (bfloat16 kernels of another processor round differently), and are stated per check."""
import copy

import pytest
import torch

from minicosy.pipeline import CosyVoice2

pytestmark = pytest.mark.usefixtures("single_thread")
TEXT = "The weather is nice today, so we walk to the park and have a picnic by the lake."


@pytest.fixture(scope="module")
def case() -> dict:
    """The tiny models in float32, a sentence, its greedy speech tokens, their mel and a voice."""
    tts = CosyVoice2.from_pretrained("tiny")
    text = tts.frontend.text_ids(TEXT)
    tokens = list(tts.lm.inference(text, sampling="greedy"))
    embedding = tts.spk2info["hibari_heart"]["embedding"].reshape(1, -1).float()
    mel = tts.flow.inference(torch.tensor([tokens]), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80),
                             embedding)
    return {"tts": tts, "text": text, "tokens": tokens, "embedding": embedding, "mel": mel}


@torch.inference_mode()
def test_lm_log_probs_in_bfloat16(case):
    """Teacher-forced over the sentence's 193 speech tokens: measured max |Δ log p| 0.75 (a rare
    position; the logits reach ±13), mean KL(fp32 ‖ bf16) 3.0e-4 nats, arg-max agreeing at 95 %."""
    lm, text, tokens = case["tts"].lm, case["text"], case["tokens"]
    rows = torch.cat([lm._special(0), lm.embed_text(text), lm._special(1), lm.embed_speech(tokens)])[None]
    half = copy.deepcopy(lm).to(torch.bfloat16)
    first = len(text) + 1                          # the rows that predict speech tokens
    ref = lm.llm_decoder(lm.llm(rows))[0, first:].float().log_softmax(-1)
    low = half.llm_decoder(half.llm(rows.bfloat16()))[0, first:].float().log_softmax(-1)
    kl = (ref.exp() * (ref - low)).sum(-1).mean()
    assert (ref - low).abs().max() < 1.5
    assert kl < 1e-3
    assert (ref.argmax(-1) == low.argmax(-1)).float().mean() > 0.9


@torch.inference_mode()
def test_flow_mel_in_bfloat16(case):
    """10 Euler steps with CFG on the same fixed noise: measured max |Δ mel| 0.19, mean 0.035 (log-mel
    values with a standard deviation of 3.2)."""
    flow = copy.deepcopy(case["tts"].flow).to(torch.bfloat16)
    mel = flow.inference(torch.tensor([case["tokens"]]), torch.zeros(1, 0, dtype=torch.long),
                         torch.zeros(1, 0, 80, dtype=torch.bfloat16), case["embedding"].bfloat16()).float()
    diff = (mel - case["mel"]).abs()
    assert diff.max() < 0.4
    assert diff.mean() < 0.07


@torch.inference_mode()
@pytest.mark.parametrize("dtype, max_diff, rms", [(torch.bfloat16, 0.06, 0.04), (torch.float16, 0.007, 0.005)])
def test_vocoder_convolutions_in_half_precision(case, dtype, max_diff, rms):
    """Same mel, same source draws: bfloat16 convolutions measured max |Δ| 0.031 and RMS error 1.8 %
    of the signal's RMS (float16: 0.0032 and 0.22 %, its 10-bit mantissa); the output stays float32."""
    hift = case["tts"].hift
    ref, _ = hift.inference(case["mel"], generator=torch.Generator().manual_seed(0))
    low, source = copy.deepcopy(hift).convolutions_in(dtype).inference(case["mel"],
                                                                       generator=torch.Generator().manual_seed(0))
    assert low.dtype == source.dtype == torch.float32
    assert (low - ref).abs().max() < max_diff
    assert (low - ref).pow(2).mean().sqrt() < rms * ref.pow(2).mean().sqrt()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        copy.deepcopy(hift).convolutions_in(torch.int8)
