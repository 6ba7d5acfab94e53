"""Flow training and sampling tools: batches cut from the corpus items, the ODE path (cosine vs
linear grid, CFG strength), the official streaming orchestration, the held-out metric, checkpoints."""
from dataclasses import asdict, replace

import numpy as np
import pytest
import soundfile as sf
import torch

from minicosy.config import get_config
from minicosy import flow as flow_module
from minicosy.flow import (CausalMaskedDiffWithXvec, FlowStreamer, collate, cosine_t_span, evaluate_masks, flow_mels,
                           gta_mels, heldout_mel_l1, prompt_state, random_batches, stream_inference, warm_start)
from minicosy.masks import FULL_CAUSAL, MASK_NAMES, NON_CAUSAL
from minicosy.train import TrainConfig, TrainLog, save_checkpoint, train_loop


@pytest.fixture(scope="module")
def small() -> CausalMaskedDiffWithXvec:
    cfg = replace(get_config("tiny").flow, encoder_blocks=1, up_encoder_blocks=1, estimator_mid_blocks=1,
                  encoder_dropout=0.0, static_chunk_tokens=5)
    torch.manual_seed(0)
    return CausalMaskedDiffWithXvec(cfg).eval()


def _items(n: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 30, (n,), generator=g).tolist()
    return [{"id": f"u{i}", "token": torch.randint(0, 6561, (t,), generator=g),
             "mel": torch.randn(2 * t, 80, generator=g).half(), "xvector": torch.randn(192, generator=g)}
            for i, t in enumerate(lengths)]


def test_collate_pads_and_cuts_token_and_mel_windows_together():
    items = _items()
    b = collate(items, max_tokens=10, rng=np.random.default_rng(0))
    assert b["token"].shape == (6, 10) and b["feat"].shape == (6, 20, 80) and b["embedding"].shape == (6, 192)
    assert b["token_len"].tolist() == [min(10, len(it["token"])) for it in items]
    for i, it in enumerate(items):                   # the mel window is the token window, x2
        n = int(b["token_len"][i])
        start = next(s for s in range(len(it["token"]) - n + 1) if torch.equal(it["token"][s:s + n], b["token"][i, :n]))
        assert torch.equal(b["feat"][i, :2 * n], it["mel"][2 * start: 2 * (start + n)].float())
    full = collate(items)
    assert full["token"].shape[1] == max(len(it["token"]) for it in items)
    short = int(full["token_len"].argmin())
    assert (full["token"][short, full["token_len"][short]:] == -1).all()
    assert (full["feat"][short, 2 * full["token_len"][short]:] == 0).all()
    batch = next(random_batches(items, 4, 7, np.random.default_rng(1)))
    assert batch["token"].shape == (4, 7)


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(small):
    model = CausalMaskedDiffWithXvec(small.cfg)
    batch = collate(_items(4))
    g = torch.Generator().manual_seed(0)
    first = model(batch["token"], batch["token_len"], batch["feat"], batch["embedding"],
                  torch.Generator().manual_seed(3))["loss"].item()
    log = train_loop(model, iter([batch] * 30), lambda b: model(b["token"], b["token_len"], b["feat"], b["embedding"], g)["loss"],
                     TrainConfig(lr=3e-3, warmup_steps=1, max_steps=30, threads=1, log_every=10))
    after = model(batch["token"], batch["token_len"], batch["feat"], batch["embedding"],
                  torch.Generator().manual_seed(3))["loss"].item()
    assert after < first and log.steps == [0, 10, 20]


@torch.no_grad()
def test_sample_path_grids_and_cfg_strength(small):
    b = collate(_items(2))
    mu, mask = small.encode(small.embed_tokens(b["token"], b["token_len"]), b["token_len"])
    spks, cond = small.speaker(b["embedding"]), torch.zeros_like(mu)
    g = lambda: torch.Generator().manual_seed(0)
    path = small.decoder.sample_path(mu, mask, spks, cond, n_timesteps=4, generator=g())
    assert path.shape == (5, *mu.shape)
    assert torch.equal(path[0], torch.randn(mu.shape, generator=g()))
    assert torch.equal(path[-1], small.decoder(mu, mask, spks, cond, n_timesteps=4, generator=g()))
    linear = small.decoder.sample_path(mu, mask, spks, cond, n_timesteps=4, generator=g(), schedule="linear")
    assert torch.equal(linear[0], path[0]) and not torch.allclose(linear[-1], path[-1])
    assert torch.allclose(cosine_t_span(4)[1:2], torch.tensor([1 - np.cos(np.pi / 8)], dtype=torch.float32))
    # beta = 0: only the conditional velocity; beta changes the result
    assert not torch.allclose(small.decoder(mu, mask, spks, cond, n_timesteps=2, generator=g(), cfg_rate=0.0),
                              small.decoder(mu, mask, spks, cond, n_timesteps=2, generator=g()))
    with pytest.raises(ValueError, match="schedule"):
        small.decoder.sample_path(mu, mask, spks, cond, schedule="quadratic")


@torch.no_grad()
def test_streaming_follows_the_official_chunk_schedule_and_keeps_no_state(small):
    g = torch.Generator().manual_seed(0)
    token, prompt = torch.randint(0, 6561, (1, 60), generator=g), torch.randint(0, 6561, (1, 7), generator=g)
    prompt_feat, emb = torch.randn(1, 14, 80, generator=g), torch.randn(1, 192, generator=g)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    # hop 5: pad = 10 - 7 = 3 -> 8 tokens, then 10, 20, then 22 left < 40 + 3 -> final call
    chunks = list(stream_inference(small, token, prompt, prompt_feat, emb, hop=5, max_hop=40))
    assert [c.shape[2] for c in chunks] == [16, 20, 40, 44]
    again = list(stream_inference(small, token, prompt, prompt_feat, emb, hop=5, max_hop=40))
    assert all(torch.equal(a, b) for a, b in zip(chunks, again))
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())
    offline = small.inference(token, prompt, prompt_feat, emb)
    assert torch.equal(chunks[-1], offline[:, :, -44:])          # the last call is the offline one
    causal = list(stream_inference(small, token, prompt, prompt_feat, emb, hop=5, max_hop=40, mask_kind=FULL_CAUSAL))
    assert causal[0].shape == chunks[0].shape and not torch.allclose(causal[0], chunks[0])


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [7, 10, 13])
def test_incremental_streaming_equals_the_recompute_path_on_chunk_masked_chunks(small, prompt_len):
    g = torch.Generator().manual_seed(1)
    token, prompt = torch.randint(0, 6561, (1, 60), generator=g), torch.randint(0, 6561, (1, prompt_len), generator=g)
    prompt_feat, emb = torch.randn(1, 2 * prompt_len, 80, generator=g), torch.randn(1, 192, generator=g)
    kw = dict(hop=5, max_hop=20, n_timesteps=3)
    recompute = list(stream_inference(small, token, prompt, prompt_feat, emb, **kw))
    incremental = list(stream_inference(small, token, prompt, prompt_feat, emb, incremental=True, **kw))
    assert [c.shape for c in incremental] == [c.shape for c in recompute]
    worst = max(float((a - b).abs().max()) for a, b in zip(recompute[:-1], incremental[:-1]))
    print(f"prompt {prompt_len}: incremental vs recompute, worst |diff| over {len(recompute) - 1} chunks: {worst:.2e}")
    assert worst < 1e-5           # measured <= 3.5e-6 at 1 and 2 threads
    # the final call differs by design: chunk-masked incrementally, non-causal when recomputed
    assert not torch.allclose(recompute[-1], incremental[-1], atol=1e-3)
    assert sum(c.shape[2] for c in incremental) == 2 * token.shape[1]
    with pytest.raises(ValueError, match="causal"):
        next(stream_inference(small, token, prompt, prompt_feat, emb, incremental=True, mask_kind=NON_CAUSAL))
    # a prompt's leading chunks computed once give the same chunks again
    state = prompt_state(small, prompt, prompt_feat, emb, n_timesteps=3)
    assert state.frames == 2 * ((prompt_len - 3) // 5 * 5)
    cached = list(stream_inference(small, token, prompt, prompt_feat, emb, incremental=True, state=state, **kw))
    assert max(float((a - b).abs().max()) for a, b in zip(cached, incremental)) < 1e-5
    again = list(stream_inference(small, token, prompt, prompt_feat, emb, incremental=True, state=state, **kw))
    assert all(torch.equal(a, b) for a, b in zip(again, cached))          # the shared state is not modified
    with pytest.raises(ValueError, match="prompt state"):
        next(stream_inference(small, token, prompt, prompt_feat, emb, state=state, **kw))



@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_incremental_cache_grows_by_bytes_per_frame_in_the_compute_dtype(small, dtype):
    """K and V per attention block, ODE step, CFG row and frame, nothing else grows: the causal-conv
    tails stay a constant; the caches hold the flow's dtype (half the bytes in bfloat16)."""
    flow = small if dtype == torch.float32 else CausalMaskedDiffWithXvec(small.cfg).eval()
    if dtype != torch.float32:
        flow.load_state_dict(small.state_dict())
        flow.to(dtype)
    g = torch.Generator().manual_seed(2)
    token, prompt = torch.randint(0, 6561, (1, 60), generator=g), torch.randint(0, 6561, (1, 10), generator=g)
    prompt_feat, emb = torch.randn(1, 20, 80, generator=g).to(dtype), torch.randn(1, 192, generator=g).to(dtype)
    streamer = FlowStreamer(flow, prompt, prompt_feat, emb, incremental=True, hop=5, max_hop=20, n_timesteps=3)
    cfg = small.cfg
    blocks = (2 + cfg.estimator_mid_blocks) * cfg.estimator_n_blocks
    per_frame = 2 * blocks * 3 * 2 * cfg.estimator_heads * cfg.estimator_attention_head_dim * dtype.itemsize
    assert streamer.bytes_per_frame() == per_frame
    sizes, frames = [], []
    while token.shape[1] >= streamer.needed:
        streamer.chunk(token)
        sizes.append(streamer.cache_bytes())
        frames.append(streamer.frames)
    tails = sizes[0] - per_frame * frames[0]
    assert tails > 0 and all(size == per_frame * n + tails for size, n in zip(sizes, frames)) and len(sizes) >= 3
    assert {t.dtype for c in streamer.caches for v in c.values() for t in (v if isinstance(v, tuple) else (v,))} \
        == {dtype}
    with torch.device("meta"):
        full = CausalMaskedDiffWithXvec(get_config("cosyvoice2_0p5b").flow)
    none = torch.zeros(1, 0, dtype=torch.long)
    assert FlowStreamer(full, none, torch.zeros(1, 0, 80), torch.zeros(1, 192)).bytes_per_frame() == 4_587_520

@torch.no_grad()
def test_heldout_l1_counts_only_generated_frames_of_each_mask(small):
    items = _items(3)
    scores = evaluate_masks(small, items, n_timesteps=2)
    assert list(scores) == list(MASK_NAMES) and all(np.isfinite(v) and v > 0 for v in scores.values())
    # the last frames are generated, never prompt: moving the target there moves the score
    moved = [dict(it, mel=it["mel"].clone()) for it in items]
    for it in moved:
        it["mel"][-2:] += 3.0
    assert heldout_mel_l1(small, moved, NON_CAUSAL, n_timesteps=2) > heldout_mel_l1(small, items, NON_CAUSAL, n_timesteps=2)


def test_checkpoint_round_trip(small, tmp_path):
    path = save_checkpoint(tmp_path / "flow.pt", small, asdict(small.cfg), TrainConfig(), TrainLog(steps=[0], losses=[1.0]))
    loaded = CausalMaskedDiffWithXvec.from_checkpoint(path)
    assert loaded.cfg == small.cfg and not loaded.training
    for k, v in small.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float())


def test_flow_mels_are_cached_24khz_mels(tmp_path):
    (tmp_path / "wavs").mkdir()
    wav = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.float32)
    sf.write(tmp_path / "wavs" / "a.wav", wav, 24000)
    (tmp_path / "manifest.jsonl").write_text('{"id": "a", "path": "wavs/a.wav", "split": "dev"}\n')
    mels = flow_mels(tmp_path, "dev")
    assert mels["a"].shape == (80, 50) and mels["a"].dtype == torch.float16
    assert (tmp_path / "cache" / "flow_mel_dev.pt").exists()
    (tmp_path / "wavs" / "a.wav").unlink()          # served from the cache now
    assert torch.equal(flow_mels(tmp_path, "dev")["a"], mels["a"])


def test_gta_mels_are_zero_shot_mels_aligned_with_each_recording(small, tmp_path, monkeypatch):
    items = [{**it, "speaker": "ab"[i % 2]} for i, it in enumerate(_items(5))]
    monkeypatch.setattr(flow_module, "load_flow_data", lambda *args, **kwargs: items)
    ckpt = save_checkpoint(tmp_path / "flow.pt", small, asdict(small.cfg), TrainConfig(), TrainLog())
    mels = gta_mels(tmp_path, ckpt, "tokenizer.pt", "campplus.pt", max_prompt_tokens=10)
    assert set(mels) == {it["id"] for it in items}
    for it in items:                                   # frame by frame the length of the recording's mel
        assert mels[it["id"]].shape == it["mel"].T.shape and mels[it["id"]].dtype == torch.float16
    # u0 (voice a) is prompted by the next utterance of its voice, u2, cut to 10 tokens
    flow, prompt = CausalMaskedDiffWithXvec.from_checkpoint(ckpt), items[2]
    with torch.no_grad():
        expected = flow.inference(items[0]["token"][None], prompt["token"][None, :10],
                                  prompt["mel"][None, :20].float(), prompt["xvector"][None])
    torch.testing.assert_close(mels["u0"].float(), expected[0], atol=1e-2, rtol=1e-2)
    monkeypatch.setattr(flow_module, "load_flow_data", None)   # served from the cache now
    assert torch.equal(gta_mels(tmp_path, ckpt, "tokenizer.pt", "campplus.pt")["u0"], mels["u0"])


def test_warm_start_across_codebooks_keeps_all_but_the_token_embedding(small, tmp_path):
    """``train flow --init`` from a flow of another codebook: every weight but the token embedding
    comes from the checkpoint; the embedding keeps its fresh initialisation; other mismatches fail."""
    path = save_checkpoint(tmp_path / "flow.pt", small, asdict(small.cfg), TrainConfig(), TrainLog())
    torch.manual_seed(1)
    other = CausalMaskedDiffWithXvec(replace(small.cfg, vocab_size=729))
    before = other.input_embedding.weight.detach().clone()
    assert warm_start(other, path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    for k, v in other.state_dict().items():
        if k != "input_embedding.weight":
            assert torch.equal(v, saved[k].to(v.dtype)), k
    assert torch.equal(other.input_embedding.weight, before)
    assert not warm_start(CausalMaskedDiffWithXvec(small.cfg), path)       # same codebook: a plain load
    with pytest.raises(ValueError, match="shape conflicts"):
        warm_start(CausalMaskedDiffWithXvec(replace(small.cfg, vocab_size=729, input_size=64)), path)
