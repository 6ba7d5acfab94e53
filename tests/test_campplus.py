"""CAM++ speaker embedding (NOTES.md §6): shapes, the official key layout and size, embed() on real
speech, the ONNX round trip (export → onnxruntime, export → converter → torch) and bad input."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from minicosy.audio import load_wav
from minicosy.campplus import (CAMPPlus, CAMPPlusONNX, export_onnx, load_from_onnx,
                               speaker_features)
from minicosy.config import CAMPPlusConfig, get_config
from minicosy.train import load_state_dict_checked

from .conftest import SHARED_DATA, need

TINY = get_config("tiny").campplus
CLIP = SHARED_DATA / "prompts" / "en_f5tts_basic_ref_en.flac"   # 24 kHz: embed() must resample


def randomized(cfg: CAMPPlusConfig, seed: int = 0) -> CAMPPlus:
    """A tiny CAM++ in eval mode whose BatchNorms hold non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    model = CAMPPlus(cfg, generator=g)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.normal_(0.0, 0.2, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> CAMPPlus:
    return randomized(TINY)


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("campplus") / "campplus.onnx")


def fbank(batch: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, frames, 80, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("frames", [3, 57, 200, 333])
def test_shapes(model, frames):
    with torch.no_grad():
        out = model(fbank(2, frames, frames))
    assert out.shape == (2, 192) and torch.isfinite(out).all()


def test_batch_rows_are_independent(model):
    x = fbank(3, 250, 1)
    with torch.no_grad():
        batched, single = model(x), model(x[1:2])
    torch.testing.assert_close(batched[1:2], single, atol=1e-5, rtol=1e-5)


def test_generator_makes_init_reproducible():
    a = CAMPPlus(TINY, generator=torch.Generator().manual_seed(3)).state_dict()
    b = CAMPPlus(TINY, generator=torch.Generator().manual_seed(3)).state_dict()
    c = CAMPPlus(TINY, generator=torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.conv1.weight"], c["head.conv1.weight"])
    assert not torch.equal(a["xvector.dense.linear.weight"], c["xvector.dense.linear.weight"])


def test_full_size_on_meta_device():
    with torch.device("meta"):
        full = CAMPPlus(CAMPPlusConfig())
        paper = CAMPPlus(CAMPPlusConfig(embedding_size=512))
    n_full = sum(p.numel() for p in full.parameters())
    n_paper = sum(p.numel() for p in paper.parameters())
    print(f"\nCAM++ parameters: {n_full:,} (192-d, campplus.onnx); {n_paper:,} (512-d, the CAM++ paper's 7.18 M)")
    assert n_full == 6_848_544 and round(n_paper / 1e6, 2) == 7.18
    keys = full.state_dict()
    assert len(keys) == 937
    assert keys["head.layer2.0.shortcut.0.weight"].shape == (32, 32, 1, 1)
    assert keys["xvector.tdnn.linear.weight"].shape == (128, 320, 5)
    assert keys["xvector.block3.tdnnd16.cam_layer.linear2.bias"].shape == (32,)
    assert keys["xvector.transit3.linear.weight"].shape == (512, 1024, 1)
    assert keys["xvector.dense.linear.weight"].shape == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.running_mean" in keys
    assert "xvector.dense.nonlinear.batchnorm.weight" not in keys      # affine=False, as official


def test_embed_real_clip(model):
    wav, sr = load_wav(need(CLIP, "shared speech clip"))
    wav = wav[: 2 * sr]
    model.train()
    emb = model.embed(wav, sr)
    assert model.training, "embed() must restore the train/eval mode"
    model.eval()
    assert emb.shape == (1, 192) and torch.isfinite(emb).all()
    feats = speaker_features(wav, sr)
    assert feats.shape[0] == 1 and feats.shape[2] == 80 and abs(feats.shape[1] - 100 * len(wav) / sr) < 3
    torch.testing.assert_close(feats.mean(dim=1), torch.zeros(1, 80), atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(emb, model(feats))


def test_onnx_file_has_official_io(onnx_path):
    graph = onnx.load(str(onnx_path)).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("input", "output")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[1] == "frames" and dims[2] == 80
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("frames", [150, 431])
def test_onnxruntime_matches_module(model, onnx_path, frames):
    x = fbank(1, frames, 7)
    with torch.no_grad():
        ref = model(x)
    err = (CAMPPlusONNX(onnx_path)(x) - ref).abs().max().item()
    print(f"\nonnxruntime vs torch, T={frames}: max abs error {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("frames", [150, 431])
def test_converter_gives_the_same_module(model, onnx_path, frames):
    converted = load_from_onnx(onnx_path, TINY)
    x = fbank(2, frames, 8)
    with torch.no_grad():
        err = (converted(x) - model(x)).abs().max().item()
    print(f"\nONNX -> torch converter, T={frames}: max abs error {err:.2e}")
    assert err < 1e-4
    # the export folded the conv-fed BatchNorms (head, TDNN, bottlenecks) and kept the others by name
    n_bn_nodes = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(onnx_path)).graph.node)
    n_bn_modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert 0 < n_bn_nodes < n_bn_modules
    ours, theirs = model.state_dict(), converted.state_dict()
    for key in ("xvector.block1.tdnnd1.nonlinear1.batchnorm.running_var", "xvector.transit2.linear.weight",
                "xvector.block2.tdnnd1.cam_layer.linear1.bias", "xvector.dense.nonlinear.batchnorm.running_mean"):
        assert torch.equal(ours[key], theirs[key]), key


def test_unfolded_export_converts_to_the_identical_state_dict(model, tmp_path):
    path = export_onnx(model, tmp_path / "unfolded.onnx", fold_batchnorm=False)
    ours, theirs = model.state_dict(), load_from_onnx(path, TINY).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.endswith("num_batches_tracked"))


def test_onnx_embed_matches_module_embed(model, onnx_path):
    wav = 0.1 * np.random.default_rng(0).standard_normal(12000).astype(np.float32)
    err = (CAMPPlusONNX(onnx_path).embed(wav, 24000) - model.embed(wav, 24000)).abs().max().item()
    assert err < 1e-4


def test_converter_rejects_other_sizes(onnx_path):
    with pytest.raises(ValueError, match="not fit this CAMPPlusConfig"):
        load_from_onnx(onnx_path, CAMPPlusConfig(growth_rate=16, init_channels=32, block_layers=(2, 4, 4),
                                                 fcm_channels=8))
    with pytest.raises(ValueError, match="not fit this CAMPPlusConfig"):
        load_from_onnx(onnx_path, CAMPPlusConfig(growth_rate=16, init_channels=32, block_layers=(2, 4, 2),
                                                 fcm_channels=8))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CAMPPlusONNX(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_from_onnx(tmp_path / "nope.onnx", TINY)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match=r"\(batch, frames, 80\)"):
        model(torch.zeros(1, 100, 40))
    with pytest.raises(ValueError, match=r"\(batch, frames, 80\)"):
        model(torch.zeros(100, 80))
    with pytest.raises(ValueError, match="at least 3 fbank frames"):
        model(torch.zeros(1, 2, 80))
    with pytest.raises(ValueError, match="silent"):
        model.embed(np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match="too short"):
        model.embed(np.full(400, 0.1, np.float32), 16000)
    with pytest.raises(ValueError, match="mono"):
        model.embed(np.zeros((2, 16000), np.float32), 16000)
    with pytest.raises(ValueError, match="sample rate"):
        model.embed(np.zeros(16000, np.float32), 0)


def test_state_dict_errors_are_readable():
    net = CAMPPlus(TINY)
    sd = net.state_dict()
    sd.pop("xvector.transit1.linear.weight")
    sd["xvector.block9.bogus"] = torch.zeros(1)
    sd["head.conv1.weight"] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(ValueError) as err:
        load_state_dict_checked(net, sd)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "xvector.transit1.linear.weight" in msg
    assert "unexpected keys (1)" in msg and "xvector.block9.bogus" in msg
    assert "shape conflicts (1)" in msg and "head.conv1.weight: checkpoint (3, 1, 3, 3) vs model (8, 1, 3, 3)" in msg
    load_state_dict_checked(net, CAMPPlus(TINY).state_dict())       # a fitting one loads
