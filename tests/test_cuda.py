"""The GPU path (issue: "device='cuda' by argument; everything works with no GPU"): the same
modules on CUDA give the CPU's numbers, the pipeline runs end to end there, and a training step
runs there. Skipped where no CUDA device is present (as in CI); run on a lent GPU machine."""
import numpy as np
import pytest
import torch

from minicosy.flow import FlowStreamer
from minicosy.pipeline import CosyVoice2
from minicosy.train import TrainConfig, to_device, train_loop

from .conftest import load_benchmark

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def tiny():
    return CosyVoice2.from_pretrained("tiny"), CosyVoice2.from_pretrained("tiny", device="cuda")


def _prompt(g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.randint(0, 6561, (1, 30), generator=g).to(device), torch.randn(1, 60, 80, generator=g).to(device) - 5,
            torch.randn(1, 192, generator=g).to(device))


def test_flow_and_vocoder_match_the_cpu(tiny):
    cpu, gpu = tiny
    g = torch.Generator().manual_seed(0)
    token = torch.randint(0, 6561, (1, 40), generator=g)
    prompt = _prompt(g, "cpu")
    mel_cpu = cpu.flow.inference(token, *prompt)                       # the official fixed noise
    mel_gpu = gpu.flow.inference(token, *(p.cuda() for p in prompt))   # CPU tokens are moved in
    torch.testing.assert_close(mel_gpu.cpu(), mel_cpu, atol=2e-2, rtol=1e-2)
    with torch.inference_mode():
        f0_cpu, f0_gpu = cpu.hift.f0_predictor(mel_cpu), gpu.hift.f0_predictor(mel_cpu.cuda())
    torch.testing.assert_close(f0_gpu.cpu(), f0_cpu, atol=1e-2, rtol=1e-2)


def test_incremental_streaming_on_the_gpu_matches_recompute(tiny):
    flow = tiny[1].flow
    g = torch.Generator().manual_seed(1)
    token, prompt = torch.randint(0, 6561, (1, 90), generator=g), _prompt(g, "cuda")
    mels = []
    for incremental in (False, True):
        s = FlowStreamer(flow, *prompt, incremental=incremental)
        mels.append(s.chunk(token))
    torch.testing.assert_close(mels[1], mels[0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("stream", [False, True])
def test_pipeline_runs_on_the_gpu(tiny, stream):
    t = np.arange(24000 * 2) / 24000
    vowel = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    outs = list(tiny[1].inference_cross_lingual("The park is green.", (vowel, 24000), stream=stream, seed=0))
    speech = torch.cat([o["tts_speech"] for o in outs], dim=1)
    assert speech.device.type == "cpu" and speech.shape[1] > 2400 and torch.isfinite(speech).all()


@torch.inference_mode()
def test_the_captured_decode_step_gives_the_eager_log_probs(tiny):
    """The static cache with the step compiled in "reduce-overhead" mode (one CUDA graph per step)."""
    lm = tiny[1].lm
    rows = torch.randn(1, 40, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(2)).cuda()
    eager, cache = lm.step(rows)
    static = lm.llm.static_cache(rows.shape[1] + 8)
    lm.step(rows, static)
    lm.compile_decode_step()
    try:
        for token in range(100, 108):
            row = lm.speech_embedding.weight[token].reshape(1, 1, -1)
            eager, cache = lm.step(row, cache)
            torch.testing.assert_close(lm.static_step(row, static), eager, atol=1e-3, rtol=0)
    finally:
        lm._compiled_step = None


def test_first_package_with_every_speed_up_runs_on_the_gpu(tmp_path):
    results = load_benchmark("first_package").main([
        "--device", "cuda", "--requests", "3", "--warmup", "2", "--registered", "--incremental", "--static-cache",
        "--compile", "--dtype", "bf16", "--hift-dtype", "bf16", "--json", str(tmp_path / "first_package.json")])
    assert results["device"] == torch.cuda.get_device_name() and results["stages"]["first_package_s"]["n"] == 3
    assert results["parity"]["lm_kl"] < 1e-3 and results["parity"]["audio_rms_rel"] < 0.1

def test_training_steps_run_on_the_gpu_and_hand_the_model_back():
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    log = train_loop(model, iter([(x, y)] * 5), lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]),
                     TrainConfig(max_steps=5, warmup_steps=1, log_every=1, device="cuda"))
    assert len(log.losses) == 5 and next(model.parameters()).device.type == "cpu"


def test_half_precision_pipeline_runs_on_the_gpu():
    tts = CosyVoice2.from_pretrained("tiny", device="cuda", dtype=torch.float16)
    t = np.arange(24000 * 2) / 24000
    outs = list(tts.inference_cross_lingual("A short test.", (0.3 * np.sin(2 * np.pi * 150 * t), 24000), seed=0))
    assert all(torch.isfinite(o["tts_speech"]).all() for o in outs)


def _same_loss_on_both_devices(model: torch.nn.Module, loss_fn, batch: dict) -> None:
    """One loss on the CPU and on the GPU (eval mode: no dropout), then two training steps there."""
    model.eval()
    with torch.no_grad():
        cpu = float(loss_fn(model, batch))
        model.cuda()
        gpu = float(loss_fn(model, to_device(batch, "cuda")))
    assert abs(cpu - gpu) <= 1e-3 * max(1.0, abs(cpu)), (cpu, gpu)
    model.cpu()
    log = train_loop(model, iter([batch] * 2), lambda b: loss_fn(model, b),
                     TrainConfig(max_steps=2, warmup_steps=1, log_every=1, device="cuda"))
    assert len(log.losses) == 2 and np.isfinite(log.losses).all()


def test_speech_tokenizer_recipe_steps_on_the_gpu():
    from minicosy.config import get_config
    from minicosy.speech_tokenizer import SpeechTokenizer, augment, build_vocab, collate, ctc_loss

    g = torch.Generator().manual_seed(0)
    items = [{"mel": torch.randn(128, 300, generator=g), "text": t, "lang": "en"}
             for t in ("we walk to the park", "the lamp is on the shelf")]
    vocab = build_vocab(items)
    batch = collate(items, vocab)
    _same_loss_on_both_devices(SpeechTokenizer(get_config("tiny").speech_tokenizer, vocab, "fsq"), ctc_loss, batch)
    masks = {"freq_masks": 2, "time_masks": 2}                 # the recipe augments there
    cpu = augment(batch["mel"], batch["mel_lengths"], np.random.default_rng(0), **masks)
    gpu = augment(batch["mel"].cuda(), batch["mel_lengths"].cuda(), np.random.default_rng(0), **masks)
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-4)


def test_lm_recipe_steps_on_the_gpu():
    import random

    from minicosy.config import get_config
    from minicosy.lm import TextSpeechLM
    from minicosy.lm_train import collate_lm

    g = torch.Generator().manual_seed(0)
    items = [{"text": torch.randint(0, 500, (n,), generator=g), "speech": torch.randint(0, 6561, (4 * n,), generator=g)}
             for n in (7, 11)]
    lm = TextSpeechLM(get_config("tiny").lm, 2000)
    _same_loss_on_both_devices(lm, lambda m, b: m(**b, rng=random.Random(0))["loss"], collate_lm(items))
