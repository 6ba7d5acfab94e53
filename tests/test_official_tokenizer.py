"""The official speech tokenizer path, checked against an independent implementation: s3tokenizer
0.3.0 (PyPI), a third-party re-implementation of speech_tokenizer_v2 with its own ONNX→torch loader.

One random-weight model (seeded; full width, heads, FSMN kernel and FSQ, 2 of the 6 blocks so that the
file is 165 MB and the module runs in half a minute) is built in s3tokenizer and exported to ONNX under
its own module names, which gives the official file's layout: anonymous ``onnx::*`` initializers for the
convolutions, the quantiser projection and every Linear (MatMul weights stored transposed). On real
recordings of every length class (mel frames T mod 4 = 0..3), minicosy's torch model (loaded from that
file by ``load_from_onnx``), onnxruntime on the file and s3tokenizer must give the same tokens, and an
official folder holding the file must tokenise prompts as the official front end does.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import types
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minicosy.audio import load_wav, mel_spectrogram, resample_sinc, whisper_log_mel
from minicosy.config import get_config
from minicosy.speech_tokenizer import (OnnxSpeechTokenizer, SpeechTokenizer, export_onnx, load_from_onnx,
                                       onnx_parameters, tokenizer_mel)

from .conftest import SHARED_DATA, need, torchaudio_or_skip

pytestmark = pytest.mark.usefixtures("single_thread")
BLOCKS = 2

# s3tokenizer's loader finds these five tensors of the real speech_tokenizer_v2.onnx by their names
OFFICIAL_ANONYMOUS = {("/conv1/Conv", 1): "onnx::Conv_2216", ("/conv1/Conv", 2): "onnx::Conv_2217",
                      ("/conv2/Conv", 1): "onnx::Conv_2218", ("/conv2/Conv", 2): "onnx::Conv_2219",
                      ("/quantizer/project_in/MatMul", 1): "onnx::MatMul_2536",
                      ("/quantizer/project_in/Add", None): "quantizer.project_in.bias"}


@pytest.fixture(scope="module")
def s3():
    """s3tokenizer's module and a seeded full-size random S3TokenizerV2 (1-D parameters perturbed so
    that no two LayerNorms are alike and a swapped mapping would show)."""
    if importlib.util.find_spec("s3tokenizer") is None:
        pytest.skip("s3tokenizer is not installed (pip install --no-deps s3tokenizer==0.3.0 einops, see README)")
    if importlib.util.find_spec("torchaudio") is None:
        # s3tokenizer imports torchaudio for its file loader only (unused here); a stand-in while it imports
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        try:
            import s3tokenizer
        finally:
            del sys.modules["torchaudio"]
    else:
        torchaudio_or_skip()
        import s3tokenizer

    torch.manual_seed(0)
    model = s3tokenizer.S3TokenizerV2("speech_tokenizer_v2_25hz", s3tokenizer.model_v2.ModelConfig(n_audio_layer=BLOCKS))
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    return s3tokenizer, model


class _S3Quantizer(nn.Module):
    """The v2 quantiser's inference (s3tokenizer FSQCodebook.encode) under the official name project_in."""

    def __init__(self, project: nn.Module):
        super().__init__()
        self.project_in = project

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        digits = (torch.tanh(self.project_in(h)) * 0.999).round() + 1
        return (digits * 3 ** torch.arange(8, dtype=digits.dtype)).sum(-1).long()


class _S3Official(nn.Module):
    """s3tokenizer's encoder blocks and convolutions at the top level (conv1, conv2, blocks.N,
    quantizer.project_in, as in the official file) for one unpadded utterance. Its complex rotary
    table cannot be exported, so the blocks get it as real (T, 64, 2) cos/sin pairs (see _real_rotary)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        enc = model.encoder
        self.conv1, self.conv2, self.blocks = enc.conv1, enc.conv2, enc.blocks
        self.quantizer = _S3Quantizer(model.quantizer._codebook.project_down)
        self.register_buffer("rotary", torch.view_as_real(enc.freqs_cis), persistent=False)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        feats = feats * (torch.arange(feats.shape[-1]) < feats_length[:, None]).unsqueeze(1)
        x = F.gelu(self.conv2(F.gelu(self.conv1(feats)))).transpose(1, 2)
        keep = torch.ones(1, x.shape[1], 1)
        for block in self.blocks:
            x = block(x, mask=None, mask_pad=keep, freqs_cis=self.rotary[: x.shape[1]])
        return self.quantizer(x)


def _real_rotary(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s3tokenizer's apply_rotary_emb (rotate-half with its cos/sin) on a real cos/sin table."""
    cos, sin = freqs_cis[None, :, None, :, 0], freqs_cis[None, :, None, :, 1]
    half = xq.shape[-1] // 2
    return tuple(x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin for x in (xq, xk))


@pytest.fixture(scope="module")
def official_folder(s3, tmp_path_factory):
    """An official folder (minicosy's tiny models in the official layout) whose
    speech_tokenizer_v2.onnx is the s3tokenizer model exported in the official layout."""
    from minicosy.official import write_official_folder
    from minicosy.pipeline import TINY_DIR, CosyVoice2
    import s3tokenizer.model_v2 as model_v2

    folder = write_official_folder(CosyVoice2.from_pretrained("tiny"), tmp_path_factory.mktemp("official") / "folder",
                                   TINY_DIR / "text_tokenizer")
    rotary, model_v2.apply_rotary_emb = model_v2.apply_rotary_emb, _real_rotary
    try:
        torch.onnx.export(_S3Official(s3[1]), (torch.randn(1, 128, 200), torch.tensor([200], dtype=torch.int32)),
                          str(folder / "speech_tokenizer_v2.onnx"), dynamo=False, opset_version=17,
                          input_names=["feats", "feats_length"], output_names=["indices"],
                          dynamic_axes={"feats": {0: "batch", 2: "frames"}, "feats_length": {0: "batch"},
                                        "indices": {0: "batch", 1: "tokens"}})
    finally:
        model_v2.apply_rotary_emb = rotary
    return folder


@pytest.fixture(scope="module")
def minicosy_model(official_folder):
    """Full-size minicosy tokenizer (official config; Encoder2 left out) loaded from the s3tokenizer file."""
    torch.manual_seed(1)
    cfg = replace(get_config("cosyvoice2_0p5b").speech_tokenizer, encoder1_layers=BLOCKS, encoder2_layers=0)
    return load_from_onnx(official_folder / "speech_tokenizer_v2.onnx", SpeechTokenizer(cfg, ["a"]).eval())


def _clips() -> list[np.ndarray]:
    """Four LibriSpeech recordings (16 kHz, four speakers) cut to 2-3 s so that their Whisper frame
    counts fall in each class T mod 4 = 0, 1, 2, 3, with odd sample remainders."""
    root = need(SHARED_DATA / "librispeech_test-other", "shared LibriSpeech recordings")
    clips = []
    for c, (speaker, remainder) in enumerate((("1688", 0), ("2033", 37), ("367", 101), ("533", 159))):
        wav, sr = load_wav(sorted((root / speaker).glob("*.flac"))[0])
        assert sr == 16000
        n = 160 * (4 * (60 + 3 * c) + c) + remainder
        clips.append(wav[8000: 8000 + n])
        assert (n // 160) % 4 == c
    return clips


def _official_resample(wav: np.ndarray, sr: int, target: int) -> torch.Tensor:
    """torchaudio.transforms.Resample (the official load_wav) where torchaudio loads; else minicosy's
    resample_sinc, which test_audio shows bit-identical to it wherever torchaudio is installed."""
    if sr == target:
        return torch.from_numpy(wav)
    if importlib.util.find_spec("torchaudio") is None:
        return torch.from_numpy(resample_sinc(wav, sr, target))
    return torchaudio_or_skip().transforms.Resample(sr, target)(torch.from_numpy(wav)[None])[0]


def test_the_s3tokenizer_file_has_the_official_layout(official_folder):
    """What the reader must cope with: official node names, anonymous initializers, MatMul weights
    stored (in, out)."""
    graph = onnx.load(str(official_folder / "speech_tokenizer_v2.onnx"), load_external_data=False).graph
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for name in ("/conv1/Conv", "/conv2/Conv", f"/blocks.{BLOCKS - 1}/attn/query/MatMul", "/blocks.0/attn/fsmn_block/Conv",
                 "/blocks.0/mlp/mlp.2/MatMul", "/quantizer/project_in/MatMul"):
        assert name in nodes, name
    assert nodes["/conv1/Conv"].input[1].startswith("onnx::Conv_")
    weight = nodes["/blocks.0/mlp/mlp.0/MatMul"].input[1]
    assert weight.startswith("onnx::MatMul_") and inits[weight] == (1280, 5120)          # (in, out)
    named = {name for name in inits if not name.startswith("onnx::")}      # as in the official file:
    assert named == {f"blocks.{i}.attn.fsmn_block.weight" for i in range(BLOCKS)} | {"quantizer.project_in.bias"}


def test_minicosy_reads_the_official_layout_strictly(s3, official_folder, minicosy_model):
    params, theirs = onnx_parameters(official_folder / "speech_tokenizer_v2.onnx"), s3[1].state_dict()
    ours = minicosy_model.state_dict()
    assert len(params) == len(theirs) == 4 + BLOCKS * 16 + 2           # convs, 16 per block, project_in
    for key, value in theirs.items():
        mine = key.replace("encoder.blocks.", "encoder1.").replace("encoder.", "").replace(
            "quantizer._codebook.project_down", "quantizer.proj_down")
        assert torch.equal(ours[mine], value), key
    too_few = SpeechTokenizer(replace(get_config("cosyvoice2_0p5b").speech_tokenizer, encoder1_layers=BLOCKS - 1,
                                      encoder2_layers=0), ["a"])
    with pytest.raises(ValueError, match=rf"unexpected \['encoder1\.{BLOCKS - 1}\.attn\.fsmn_block\.weight"):
        load_from_onnx(official_folder / "speech_tokenizer_v2.onnx", too_few)


def test_tokens_agree_with_onnxruntime_and_s3tokenizer_in_every_length_class(s3, official_folder, minicosy_model):
    s3tokenizer, model = s3
    session = OnnxSpeechTokenizer(official_folder / "speech_tokenizer_v2.onnx")
    distinct = set()
    for c, wav in enumerate(_clips()):
        ours = minicosy_model.tokenize(wav, 16000)
        mel = s3tokenizer.log_mel_spectrogram(torch.from_numpy(wav))
        torch.testing.assert_close(whisper_log_mel(wav), mel, atol=1e-5, rtol=1e-5)
        codes, lengths = model.quantize(mel[None], torch.tensor([mel.shape[-1]]))
        assert len(ours) == int(lengths[0]) == -(-mel.shape[-1] // 4), c         # ceil(T / 4), unpadded
        assert torch.equal(ours, codes[0].long()), c
        assert torch.equal(session.tokenize(wav, 16000), ours), c
        distinct |= set(ours.tolist())
    assert len(distinct) > 50                          # the random model does tell frames apart


def test_official_folder_tokenizes_prompts_as_the_official_front_end(s3, official_folder):
    """Prompts at 24 kHz and 22.05 kHz through read_official_folder's front end: resampled to 16 kHz
    by torchaudio's Resample, s3tokenizer's log-mel of the unpadded waveform, its model: the same
    tokens (trimmed to the prompt mel, 2 frames per token, as officially)."""
    from minicosy.official import read_official_folder

    s3tokenizer, model = s3
    frontend = read_official_folder(official_folder)["frontend"]
    prompts = need(SHARED_DATA / "prompts", "shared prompt recordings")
    lj, sr_lj = load_wav(need(SHARED_DATA / "ljspeech_lj001", "shared LJSpeech recordings") / "LJ001-0002.flac")
    for wav, sr in (load_wav(prompts / "en_f5tts_basic_ref_en.flac"), (lj[: int(2.7 * sr_lj)], sr_lj)):
        prompt = frontend.prompt((wav, sr))
        wav16, wav24 = _official_resample(wav, sr, 16000), _official_resample(wav, sr, 24000)
        mel = s3tokenizer.log_mel_spectrogram(wav16)
        codes, _ = model.quantize(mel[None], torch.tensor([mel.shape[-1]]))
        n = min(mel_spectrogram(wav24).shape[-1] // 2, codes.shape[1])
        assert prompt.speech_token.shape[1] == n >= codes.shape[1] - 1
        assert torch.equal(prompt.speech_token[0], codes[0, :n].long()), sr
        assert torch.equal(prompt.embedding, frontend.speaker_model.embed(wav16.numpy(), 16000).reshape(1, -1))
        assert not torch.equal(tokenizer_mel(wav, sr, pad_to_tokens=False), tokenizer_mel(wav, sr, False, "sinc"))


def test_s3tokenizer_reads_minicosy_official_export(s3, minicosy_model, tmp_path):
    """The other direction: minicosy's export_onnx(layout="official"), with the five tensors that
    s3tokenizer's loader finds by name given the real file's names, loads strictly into s3tokenizer."""
    s3tokenizer, model = s3
    path = export_onnx(minicosy_model, tmp_path / "speech_tokenizer_v2.onnx", layout="official")
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            new = OFFICIAL_ANONYMOUS.get((node.name, k)) or OFFICIAL_ANONYMOUS.get((node.name, None))
            if new and name in inits:
                inits[name].name, node.input[k] = new, new
    onnx.save(proto, str(path))
    again = s3tokenizer.S3TokenizerV2("speech_tokenizer_v2_25hz", s3tokenizer.model_v2.ModelConfig(n_audio_layer=BLOCKS))
    again.init_from_onnx(str(path))                                   # load_state_dict(strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    shutil.rmtree(tmp_path, ignore_errors=True)
