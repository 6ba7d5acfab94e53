"""The supervised speech tokenizer (§2.2): 25 Hz tokens, features for analysis, ONNX paths."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from minicosy.audio import whisper_log_mel
from minicosy.config import get_config
from minicosy.speech_tokenizer import (OnnxSpeechTokenizer, SpeechTokenizer, export_onnx, load_from_onnx,
                                       num_tokens, tokenizer_mel)

from .conftest import ROOT

VOCAB = list("abcdefghijklmnopqrstuvwxyz' ")


def _model(seed: int, quantizer: str = "fsq") -> SpeechTokenizer:
    torch.manual_seed(seed)
    model = SpeechTokenizer(get_config("tiny").speech_tokenizer, VOCAB, quantizer).eval()
    with torch.no_grad():        # like trained weights: no two norm layers identical
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _speech(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.mark.parametrize("seconds", [1.0, 2.5, 3.37])
def test_token_rate_is_25_per_second(seconds):
    model = _model(0)
    codes = model.tokenize(_speech(seconds), 16000)
    assert codes.dtype == torch.long and len(codes) == num_tokens(int(seconds * 16000)) == int(np.ceil(seconds * 25))
    assert len(model.tokenize(_speech(seconds, 24000), 24000)) == len(codes)      # any input rate
    assert codes.min() >= 0 and codes.max() < 6561


def test_length_rule_counts_every_frame_the_convolutions_produce():
    """token_lengths is the output length of the two stride-2 convolutions for every T (T mod 4 =
    0..3): the last real frame is never masked as padding."""
    model = _model(0)
    for t in range(1, 41):
        frames = model.conv2(model.conv1(torch.zeros(1, 128, t))).shape[-1]
        assert int(SpeechTokenizer.token_lengths(torch.tensor(t))) == frames, t
    mel = torch.randn(1, 128, 41)                      # T mod 4 = 1: 11 frames, all of them real
    assert not model.encode(mel, torch.tensor([41]))[1].any()


def test_official_tokenizer_has_no_layernorm_before_the_quantiser():
    """The official speech_tokenizer_v2 projects H straight down to the FSQ digits; the tiny preset's
    LayerNorm there is a named switch (SpeechTokenizerConfig.quant_layernorm)."""
    cfg = get_config("cosyvoice2_0p5b").speech_tokenizer
    assert not cfg.quant_layernorm and get_config("tiny").speech_tokenizer.quant_layernorm
    with torch.device("meta"):
        official = SpeechTokenizer(cfg, VOCAB)
    assert not any(k.startswith("ln_quant.") for k in official.state_dict())
    assert "ln_quant.weight" in _model(0).state_dict()


def test_forward_exposes_pre_and_post_quantisation_features():
    model = _model(0)
    mel = torch.randn(2, 128, 400)
    out = model(mel, torch.tensor([400, 240]))
    assert out["pre"].shape == out["post"].shape == (2, 100, 128)
    assert out["lengths"].tolist() == [100, 60]
    assert out["log_probs"].shape == (2, 100, len(VOCAB) + 1)
    torch.testing.assert_close(model.quantizer.decode(out["codes"]), out["post"])
    vq = _model(0, "vq")
    assert vq(mel, torch.tensor([400, 240]))["aux_loss"] > 0 and vq.codebook_size == 4096


def test_padding_does_not_change_codes():
    model = _model(1)
    mel = torch.randn(1, 128, 160)
    alone = model(mel, torch.tensor([160]))["codes"][0]
    padded = model(torch.cat([mel, torch.randn(1, 128, 80)], dim=2), torch.tensor([160]))["codes"][0, :40]
    assert torch.equal(alone, padded)


def test_bad_audio_is_refused():
    with pytest.raises(ValueError, match="silent"):
        _model(0).tokenize(np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="quantizer"):
        SpeechTokenizer(get_config("tiny").speech_tokenizer, VOCAB, "rvq")


def test_official_front_end_does_not_pad():
    """The official front end tokenises the log-mel of the waveform as it is: n samples give n // 160
    frames and ceil(frames / 4) tokens; the tiny recipe pads to whole tokens (ceil(n / 640))."""
    model = _model(0)
    official = SpeechTokenizer(replace(model.cfg, pad_to_tokens=False), VOCAB).eval()
    official.load_state_dict(model.state_dict())
    for n in (16000, 16000 + 160, 16000 + 2 * 160 + 7, 16000 + 3 * 160 + 159):   # frames mod 4 = 0..3
        wav = _speech(n / 16000)[:n]
        codes = official.tokenize(wav, 16000)
        assert len(codes) == num_tokens(n, pad_to_tokens=False) == -(-(n // 160) // 4)
        mel = whisper_log_mel(wav)[None]
        assert torch.equal(codes, official.quantizer(official.ln_quant(official.encode(mel, torch.tensor([mel.shape[-1]]))[0]))[1][0])
        assert len(model.tokenize(wav, 16000)) == num_tokens(n) == -(-n // 640)
    assert torch.equal(tokenizer_mel(wav, 16000, False), mel)
    assert tokenizer_mel(wav, 16000, True).shape[-1] == -(-n // 640) * 4


def test_checkpoints_from_before_the_option_were_trained_padded():
    path = ROOT / "data" / "checkpoints" / "speech_tokenizer_fsq.pt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    assert SpeechTokenizer.from_checkpoint(path).cfg.pad_to_tokens
    assert get_config("tiny").speech_tokenizer.pad_to_tokens and not get_config("cosyvoice2_0p5b").speech_tokenizer.pad_to_tokens


@pytest.mark.parametrize("layout", ["official", "minicosy"])
@pytest.mark.parametrize("trained", [True, False])
def test_onnx_run_and_conversion_give_identical_codes(tmp_path, layout, trained):
    """Both layouts round-trip, also for a default-initialised model whose LayerNorms are all alike
    (the exporter then shares one initializer among them through Identity nodes)."""
    if trained:
        model = _model(2)
    else:
        torch.manual_seed(2)
        model = SpeechTokenizer(get_config("tiny").speech_tokenizer, VOCAB).eval()
    path = export_onnx(model, tmp_path / "speech_tokenizer.onnx", layout=layout)
    own_rule = OnnxSpeechTokenizer(path, pad_to_tokens=True, resampling="soxr")
    assert own_rule.inputs == ["feats", "feats_length"]
    converted = load_from_onnx(path, _model(3))                 # other weights before conversion
    state = converted.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()
               if k.startswith(("conv", "encoder1.", "ln_quant.", "quantizer.proj_down.")))
    for seconds in (1.3, 4.0):
        wav = _speech(seconds)
        ref = model.tokenize(wav, 16000)
        assert torch.equal(own_rule.tokenize(wav, 16000), ref)
        assert torch.equal(converted.tokenize(wav, 16000), ref)
        mel = whisper_log_mel(wav)[None]                         # the official rule: no padding
        official = model.quantizer(model.ln_quant(model.encode(mel, torch.tensor([mel.shape[-1]]))[0]))[1][0]
        assert torch.equal(OnnxSpeechTokenizer(path).tokenize(wav, 16000), official)


def test_official_layout_names_nodes_as_the_official_file(tmp_path):
    import onnx

    model = _model(4)
    graph = onnx.load(str(export_onnx(model, tmp_path / "t.onnx"))).graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for name in ("/conv1/Conv", "/blocks.1/attn_ln/LayerNormalization", "/blocks.0/attn/key/MatMul",
                 "/blocks.1/attn/fsmn_block/Conv", "/blocks.0/mlp/mlp.2/Add", "/quantizer/project_in/MatMul"):
        assert name in nodes, name
    weight = nodes["/blocks.0/mlp/mlp.0/MatMul"].input[1]
    assert weight.startswith("onnx::MatMul_")                  # anonymous, stored (in, out)
    stored = torch.from_numpy(onnx.numpy_helper.to_array(inits[weight]).copy())
    assert torch.equal(stored, model.encoder1[0].mlp[0].weight.detach().T)
    with pytest.raises(ValueError, match="layout"):
        export_onnx(model, tmp_path / "t.onnx", layout="theirs")
    with pytest.raises(ValueError, match="FSQ"):
        export_onnx(_model(0, "vq"), tmp_path / "vq.onnx")


def test_load_from_onnx_names_what_it_cannot_map(tmp_path):
    path = export_onnx(_model(2), tmp_path / "speech_tokenizer.onnx")
    tiny = get_config("tiny").speech_tokenizer
    with pytest.raises(ValueError, match=r"missing \['quantizer.codebook.weight'\]"):
        load_from_onnx(path, SpeechTokenizer(tiny, VOCAB, "vq"))
    with pytest.raises(ValueError, match=r"unexpected \['encoder1\.1\.attn\.fsmn_block\.weight"):
        load_from_onnx(path, SpeechTokenizer(replace(tiny, encoder1_layers=1), VOCAB))
    with pytest.raises(ValueError, match=r"unexpected \['ln_quant.bias', 'ln_quant.weight'\]"):
        load_from_onnx(path, SpeechTokenizer(replace(tiny, quant_layernorm=False), VOCAB))
    with pytest.raises(ValueError, match=r"shape conflicts \['encoder1\.0\.attn\.fsmn_block\.weight \(128, 1, 11\)"):
        load_from_onnx(path, SpeechTokenizer(replace(tiny, fsmn_kernel=7), VOCAB))
    with pytest.raises(FileNotFoundError):
        OnnxSpeechTokenizer(tmp_path / "absent.onnx")


def test_english_reading_units_are_dictionary_phones():
    from minicosy.speech_tokenizer import english_phones, transcript

    assert transcript("Two cats.", "en") == ["T", "UW", "▁", "K", "AE", "T", "S"]
    assert transcript("It's 5 o'clock!", "en")[:4] == ["IH", "T", "S", "▁"]          # numbers read out
    assert english_phones("weeknight") == english_phones("week") + english_phones("night")
    assert english_phones("bakery's") == english_phones("bakery") + ["Z"]
    assert english_phones("mbps") == ["EH", "M", "B", "IY", "P", "IY", "EH", "S"]   # letter names


def _band_batch(frames: int = 200, band: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    mel = torch.full((2, 128, frames), -0.5)
    mel[:, band] = 1.0
    return mel, torch.tensor([frames, frames // 2])


def test_augment_warps_time_and_frequency_and_masks():
    from minicosy.audio import mel_band_centres
    from minicosy.speech_tokenizer import augment

    mel, lengths = _band_batch()
    rng = np.random.default_rng(0)
    same, same_len = augment(mel, lengths, rng, tempo=(1, 1), warp=(1, 1))
    assert torch.equal(same_len, lengths) and torch.allclose(same[0], mel[0], atol=1e-4)
    assert same[1, :, 100:].abs().max() == 0                                  # padding stays zero
    slow, slow_len = augment(mel, lengths, rng, tempo=(0.5, 0.5), warp=(1, 1))
    assert slow_len.tolist() == [400, 200] and slow.shape[-1] == 400
    up, _ = augment(mel, lengths, rng, tempo=(1, 1), warp=(1.2, 1.2))
    centres = mel_band_centres(16000, 128)
    peak = int(up[0, :, 10].argmax())                 # the band moved to where centre ≈ 1.2 × its own
    assert abs(centres[peak] / centres[40] - 1.2) < 0.05
    masked, _ = augment(mel, lengths, rng, tempo=(1, 1), warp=(1, 1), freq_masks=1, freq_width=128,
                        time_masks=0)
    assert (masked[0] == -0.5).float().mean() > 0.0 and masked[0].max() <= 1.0


def test_augmented_ctc_loss_trains():
    from minicosy.speech_tokenizer import augment, ctc_loss

    model = _model(0).train()
    mel, lengths = _band_batch()
    batch = {"mel": mel, "mel_lengths": lengths, "targets": torch.tensor([1, 2, 3, 4]),
             "target_lengths": torch.tensor([2, 2])}
    rng = np.random.default_rng(0)
    aug_mel, aug_len = augment(mel, lengths, rng)
    loss = ctc_loss(model, {**batch, "mel": aug_mel, "mel_lengths": aug_len})
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad.abs().sum() > 0


def test_extract_of_augmented_mels_gives_other_tokens():
    from minicosy.speech_tokenizer import extract

    g = torch.Generator().manual_seed(0)
    records = [{"id": f"u{i}", "speaker": "s", "lang": "en", "text": "a", "mel": torch.randn(128, 200, generator=g)}
               for i in range(3)]
    model = _model(0)
    plain = extract(model, records)
    again = extract(model, records, rng=np.random.default_rng(1))
    same = extract(model, records, rng=np.random.default_rng(1))
    assert [len(f["codes"]) for f in plain] == [50, 50, 50]
    assert all(torch.equal(a["codes"], b["codes"]) for a, b in zip(again, same))          # seeded
    assert any(len(a["codes"]) != 50 or not torch.equal(a["codes"], p["codes"]) for a, p in zip(again, plain))
