"""HiFT vocoder (NOTES.md §5) against the official code's golden outputs and the full-size manifest."""
import json

import pytest
import torch

from minicosy.config import HiFTConfig, get_config
from minicosy.hift import HiFTGenerator, load_hift_state_dict, load_official_hift

from .conftest import GOLDEN, MANIFESTS, need

GOLDEN_CFG = HiFTConfig(base_channels=32, f0_channels=32)  # golden/config.json "hift", "hift_f0_predictor"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def golden_state() -> dict:
    return torch.load(need(GOLDEN / "hift.pt", "golden HiFT weights"), weights_only=True)


@pytest.fixture(scope="module")
def fixtures() -> dict:
    return torch.load(need(GOLDEN / "hift_fixtures.pt", "golden HiFT fixtures"), weights_only=True)


@pytest.fixture(scope="module")
def hift(golden_state) -> HiFTGenerator:
    return load_official_hift(golden_state, GOLDEN_CFG)


@pytest.fixture(scope="module")
def tiny_hift() -> HiFTGenerator:
    return HiFTGenerator(get_config("tiny").hift).eval()


def test_full_size_module_matches_the_manifest():
    manifest = json.loads(need(MANIFESTS / "hift.pt.keys.json", "HiFT key manifest").read_text())
    with torch.device("meta"):
        model = HiFTGenerator(HiFTConfig())
    got = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert got == manifest


def test_checkpoint_widths_are_read_from_the_file(golden_state):
    model = load_official_hift(golden_state)
    assert (model.cfg.base_channels, model.cfg.f0_channels, model.cfg.in_channels) == (32, 32, 80)
    assert not model.training


def test_f0_predictor_and_source_stft_match_official(hift, fixtures):
    with torch.no_grad():
        f0 = hift.f0_predictor(fixtures["mel"])
        real, imag = hift.stft(fixtures["source"])
    torch.testing.assert_close(f0, fixtures["f0_predictor_out"], atol=1e-5, rtol=1e-4)
    assert (f0 >= 0).all()
    torch.testing.assert_close(real, fixtures["source_stft_real"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(imag, fixtures["source_stft_imag"], atol=1e-5, rtol=1e-4)


def test_decode_matches_official(hift, fixtures):
    with torch.no_grad():
        out = hift.decode(fixtures["mel"], fixtures["source"])
    torch.testing.assert_close(out, fixtures["decode_out"], atol=1e-4, rtol=0)


def test_source_module_consumes_the_rng_as_official(hift, fixtures):
    f0 = torch.full((1, 24000, 1), 200.0)
    sine_merge, uv = hift.m_source(f0, torch.Generator().manual_seed(123))
    torch.testing.assert_close(sine_merge, fixtures["m_source_f0_200hz_seed123_sine_merge"], atol=1e-5, rtol=0)
    torch.testing.assert_close(uv, fixtures["m_source_uv"], atol=0, rtol=0)


def test_inference_with_seeded_generator_matches_official(hift, fixtures):
    speech, source = hift.inference(fixtures["mel"], generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(source, fixtures["inference_seed123_source"], atol=1e-5, rtol=0)
    torch.testing.assert_close(speech, fixtures["inference_seed123_speech"], atol=1e-4, rtol=0)
    with torch.random.fork_rng():  # without a generator the global RNG is used, as official
        torch.manual_seed(123)
        speech_global, _ = hift.inference(fixtures["mel"])
    torch.testing.assert_close(speech_global, speech, atol=0, rtol=0)


def test_legacy_weight_norm_and_generator_prefixed_keys_load(golden_state, hift, fixtures):
    legacy = {"generator." + k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v for k, v in golden_state.items()}
    assert any(k.endswith("weight_g") for k in legacy)
    model = load_official_hift(legacy, GOLDEN_CFG)
    for (k, a), b in zip(model.state_dict().items(), hift.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_checkpoint_names_missing_unexpected_and_shape_conflicts(golden_state, tmp_path):
    broken = dict(golden_state)
    del broken["conv_post.bias"]
    broken["extra.weight"] = torch.zeros(1)
    broken["m_source.l_linear.weight"] = torch.zeros(1, 5)
    with pytest.raises(ValueError) as err:
        load_hift_state_dict(HiFTGenerator(GOLDEN_CFG), broken)
    message = str(err.value)
    assert "conv_post.bias" in message and "extra.weight" in message
    assert "m_source.l_linear.weight: checkpoint (1, 5) vs model (1, 9)" in message
    with pytest.raises(ValueError, match="missing keys"):  # full-size config vs the reduced checkpoint
        load_official_hift(golden_state, HiFTConfig())
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_official_hift(tmp_path / "nowhere.pt")


def test_output_length_is_480_samples_per_frame_and_clamped(tiny_hift):
    mel = torch.randn(2, 80, 3)
    speech, source = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(0))
    assert speech.shape == (2, 3 * 480) and source.shape == (2, 1, 3 * 480)
    loud = HiFTGenerator(get_config("tiny").hift).eval()
    with torch.no_grad():
        loud.conv_post.bias[:9] = 8.0  # magnitudes e^8 ≈ 3000, clipped at 100 before the iSTFT
    speech = loud.decode(mel, source)
    assert speech.abs().max().item() == pytest.approx(0.99)
    assert (speech.abs() == 0.99).sum() > 0


def test_randomness_only_through_the_generator(tiny_hift):
    mel = torch.randn(1, 80, 4)
    a, sa = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(1))
    b, sb = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(1))
    c, sc = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(sa, sb) and not torch.equal(sa, sc)
    assert torch.equal(tiny_hift.decode(mel, sa), tiny_hift.decode(mel, sa))


def test_cache_source_overwrites_the_start_of_the_new_source(tiny_hift):
    mel = torch.randn(1, 80, 4)
    cache = torch.full((1, 1, 480), 0.5)
    plain, source = tiny_hift.inference(mel, generator=torch.Generator().manual_seed(3))
    cached, cached_source = tiny_hift.inference(mel, cache, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached_source[..., :480], cache)
    assert torch.equal(cached_source[..., 480:], source[..., 480:])
    assert torch.equal(cached, tiny_hift.decode(mel, cached_source)) and not torch.equal(cached, plain)
    with pytest.raises(ValueError, match="cache_source"):
        tiny_hift.inference(mel, torch.zeros(1, 1, 5 * 480))


def test_bad_inputs_raise_value_errors(tiny_hift):
    with pytest.raises(ValueError, match="mel must be"):
        tiny_hift.inference(torch.randn(1, 40, 4))
    with pytest.raises(ValueError, match="source must be"):
        tiny_hift.decode(torch.randn(1, 80, 4), torch.zeros(1, 1, 4 * 400))


def test_training_forward_returns_speech_and_f0_with_gradients():
    model = HiFTGenerator(get_config("tiny").hift)
    speech, f0 = model(torch.randn(1, 80, 2), torch.Generator().manual_seed(0))
    assert speech.shape == (1, 960) and f0.shape == (1, 2)
    (speech.sum() + f0.sum()).backward()
    assert model.conv_pre.parametrizations.weight.original1.grad is not None
    assert model.f0_predictor.classifier.weight.grad is not None
