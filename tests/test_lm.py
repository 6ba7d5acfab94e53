"""Text-speech LM (§2.3): sequence layouts, loss, sampling, inference modes and official-weight parity."""
import dataclasses
import json
import random
import shutil

import pytest
import torch

from minicosy.config import UNIT_MIX_RATIO, UNIT_TOKEN_TEXT_RATIO, LMConfig, get_config, lm_for_units
from minicosy.lm import IGNORE_ID, TextSpeechLM, lm_accuracy, lm_loss, load_official_llm
from minicosy.lm_sampling import greedy_sampling, nucleus_candidates, ras_sampling

from .conftest import GOLDEN, MANIFESTS, ROOT, need

EOS, FILL = 6561, 6563
TINY = LMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fx() -> dict:
    return torch.load(need(GOLDEN / "llm_fixtures.pt", "golden LLM fixtures"), weights_only=True)


@pytest.fixture(scope="module")
def golden_lm() -> TextSpeechLM:
    need(GOLDEN / "llm.pt", "golden llm.pt")
    return load_official_llm(GOLDEN / "llm.pt", qwen_dir=GOLDEN / "CosyVoice-BlankEN-tiny")


@pytest.fixture(scope="module")
def tiny_lm() -> TextSpeechLM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TextSpeechLM(TINY, text_vocab_size=1000).eval()


def _batch(fx: dict, branch: str) -> tuple:
    return tuple(fx[f"{branch}_{k}"] for k in ("text_token", "text_token_len", "speech_token", "speech_token_len"))


# ----- training sequences ----------------------------------------------------------------------
@pytest.mark.parametrize("branch", ["unistream", "bistream"])
def test_training_sequences_match_golden(golden_lm, fx, branch):
    bistream = branch == "bistream"
    target, lm_input, lm_input_len = golden_lm.prepare_lm_input_target(*_batch(fx, branch), bistream=bistream)
    assert torch.equal(target, fx[f"{branch}_lm_target"])
    assert torch.equal(lm_input_len, fx[f"{branch}_lm_input_len"])
    torch.testing.assert_close(lm_input, fx[f"{branch}_lm_input"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("branch", ["unistream", "bistream"])
def test_training_layout_matches_official_json(tiny_lm, fx, branch):
    """Tagged tables: text id i -> (1, i), speech id i -> (2, i), sos -> (3, 0), task_id -> (4, 0)."""
    layout = json.loads(need(GOLDEN / "llm_prepare_lm_input_target_layout.json", "golden layout").read_text())[branch]
    lm = TextSpeechLM(TINY, text_vocab_size=100)
    with torch.no_grad():
        for table, kind in ((lm.llm.model.model.embed_tokens.weight, 1), (lm.speech_embedding.weight, 2)):
            table.zero_()
            table[:, 0] = kind
            table[:, 1] = torch.arange(len(table))
        lm.llm_embedding.weight.zero_()
        lm.llm_embedding.weight[:, 0] = torch.tensor([3.0, 4.0])
    text_len, speech_len = fx[f"{branch}_text_token_len"], fx[f"{branch}_speech_token_len"]
    text, speech = torch.arange(12).repeat(2, 1), torch.arange(50).repeat(2, 1)
    _, rows, _ = lm.prepare_lm_input_target(text, text_len, speech, speech_len, bistream=branch == "bistream")
    names = {1: "t{}", 2: "s{}", 3: "sos", 4: "task_id", -1: "PAD(-1)"}
    for b in range(2):
        got = [names[int(r[0])].format(int(r[1])) for r in rows[b]]
        assert got == layout[f"example{b}"]["input_layout"]
    target, _, lm_input_len = tiny_lm.prepare_lm_input_target(*_batch(fx, branch), bistream=branch == "bistream")
    for b in range(2):
        assert target[b].tolist() == layout[f"example{b}"]["lm_target"]
        assert int(lm_input_len[b]) == layout[f"example{b}"]["lm_input_len"]


def test_branch_rule_coin_and_length_condition(tiny_lm):
    text = torch.arange(10).repeat(8, 1)
    lens = torch.full((8,), 10, dtype=torch.int32)
    speech = torch.arange(40).repeat(8, 1)
    ratio_ok = torch.full((8,), 40, dtype=torch.int32)           # 40/10 > 15/5
    target, _, _ = tiny_lm.prepare_lm_input_target(text, lens, speech, ratio_ok, rng=random.Random(3))
    replay = random.Random(3)
    coins = [replay.random() < 0.5 for _ in range(8)]
    assert [bool((t == FILL).any()) for t in target] == coins and any(coins) and not all(coins)
    # exactly 15/5 is not > 15/5: unistream even when the coin says bistream
    ratio_3 = torch.full((8,), 30, dtype=torch.int32)
    target, _, _ = tiny_lm.prepare_lm_input_target(text, lens, speech, ratio_3, bistream=True)
    assert not (target == FILL).any()
    # a torch.Generator drives the coin reproducibly
    runs = [tiny_lm.prepare_lm_input_target(text, lens, speech, ratio_ok, rng=torch.Generator().manual_seed(5))[0]
            for _ in range(2)]
    assert torch.equal(*runs)


def test_loss_and_accuracy_follow_official_definitions(tiny_lm, fx):
    out = tiny_lm(*_batch(fx, "bistream"), bistream=True)
    logits, target = out["logits"], out["target"]
    keep = target != IGNORE_ID
    # official LabelSmoothingLoss with smoothing 0: KL(one-hot || softmax) summed, / #tokens
    true = torch.zeros_like(logits).scatter_(-1, target.clamp(min=0)[..., None], 1.0)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), true, reduction="none").sum(-1)
    torch.testing.assert_close(out["loss"], (kl * keep).sum() / keep.sum())
    assert out["acc"] == (logits.argmax(-1)[keep] == target[keep]).float().mean()
    out["loss"].backward()
    assert tiny_lm.speech_embedding.weight.grad is not None
    tiny_lm.zero_grad()
    perfect = torch.nn.functional.one_hot(target.clamp(min=0), 6564).float() * 50
    assert lm_accuracy(perfect, target) == 1.0 and lm_loss(perfect, target) < 1e-6


# ----- golden parity ---------------------------------------------------------------------------
def test_golden_forward_hidden_and_logits(golden_lm, fx):
    with torch.no_grad():
        hidden = golden_lm.llm(fx["lm_input"], torch.tensor([40]))
        torch.testing.assert_close(hidden, fx["llm_hidden_full"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(golden_lm.llm_decoder(hidden), fx["llm_decoder_logits_full"], atol=1e-5, rtol=1e-4)
        rows = torch.cat([golden_lm._special(0), golden_lm.embed_text(torch.cat([fx["prompt_text"], fx["text"]], 1)),
                          golden_lm._special(1), golden_lm.embed_speech(fx["prompt_speech_token"])])
    assert torch.equal(rows, fx["lm_input"][0])


def test_golden_kv_cache_steps(golden_lm, fx):
    logp, cache = golden_lm.step(fx["lm_input"])
    steps = [logp]
    for token in fx["kv_forced_tokens"]:
        logp, cache = golden_lm.step(golden_lm.speech_embedding.weight[token].reshape(1, 1, -1), cache)
        steps.append(logp)
    torch.testing.assert_close(torch.stack(steps), fx["kv_step_logp"], atol=1e-5, rtol=0)


def test_golden_greedy_inference(golden_lm, fx):
    kw = dict(sampling="greedy", min_token_text_ratio=1, max_token_text_ratio=3)
    args = fx["text"], fx["prompt_text"], fx["prompt_speech_token"]
    assert list(golden_lm.inference(*args, **kw)) == fx["greedy_inference_tokens"].tolist()
    with torch.no_grad():
        golden_lm.llm_decoder.bias[EOS] += 1000
    try:
        assert list(golden_lm.inference(*args, **kw)) == fx["greedy_inference_tokens_eos_boosted"].tolist()
    finally:
        with torch.no_grad():
            golden_lm.llm_decoder.bias[EOS] -= 1000



def test_static_cache_gives_the_dynamic_logits_and_tokens(golden_lm, fx):
    """The pre-allocated KV cache (every step attends over all its rows, the unused ones masked)
    changes only the summation: log-probs within 1e-5 of the dynamic cache's, the same tokens."""
    rows = fx["lm_input"]
    forced = [golden_lm.speech_embedding.weight[t].reshape(1, 1, -1) for t in fx["kv_forced_tokens"]]
    dynamic, cache = golden_lm.step(rows)
    static_cache = golden_lm.llm.static_cache(rows.shape[1] + len(forced))
    static, _ = golden_lm.step(rows, static_cache)
    dynamic, static = [dynamic], [static]
    for row in forced:
        logp, cache = golden_lm.step(row, cache)
        dynamic.append(logp)
        static.append(golden_lm.static_step(row, static_cache))
    torch.testing.assert_close(torch.stack(static), torch.stack(dynamic), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(static), fx["kv_step_logp"], atol=1e-5, rtol=0)
    kw = dict(sampling="greedy", min_token_text_ratio=1, max_token_text_ratio=3)
    args = fx["text"], fx["prompt_text"], fx["prompt_speech_token"]
    assert list(golden_lm.inference(*args, **kw, static_cache=True)) == fx["greedy_inference_tokens"].tolist()
    sample = lambda static: list(golden_lm.inference(*args, generator=torch.Generator().manual_seed(3),
                                                     max_token_text_ratio=3, static_cache=static))
    assert sample(True) == sample(False)
    with pytest.raises(ValueError, match="static_cache must be"):
        golden_lm.inference(*args, static_cache="yes")


def test_compiled_decode_step_is_traced_once_and_gives_the_same_tokens(golden_lm, fx):
    """torch.compile's tracing (the eager backend: the compiler itself is exercised by the GPU
    benchmark) over the static cache: one graph, reused by every step, same greedy tokens."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kw = dict(sampling="greedy", min_token_text_ratio=1, max_token_text_ratio=3, static_cache=True)
    args = fx["text"], fx["prompt_text"], fx["prompt_speech_token"]
    golden_lm.compile_decode_step(backend="eager")
    try:
        for _ in range(2):
            assert list(golden_lm.inference(*args, **kw)) == fx["greedy_inference_tokens"].tolist()
    finally:
        golden_lm._compiled_step = None
    assert counters["stats"]["unique_graphs"] == 1

def test_golden_ras_sampling(fx):
    logp = fx["ras_demo_logp"]
    assert torch.equal(nucleus_candidates(logp)[0], fx["ras_demo_nucleus_candidates"])
    history: list[int] = []
    with torch.random.fork_rng():
        torch.manual_seed(7)
        for _ in range(20):
            history.append(ras_sampling(logp, history))
    assert history == fx["ras_demo_seed7_tokens"].tolist()


def test_ras_repetition_rule_and_generator():
    logp = torch.full((6564,), -30.0)
    logp[5] = 0.0                                     # id 5 holds ~all the mass
    assert ras_sampling(logp, [1, 2]) == 5
    assert ras_sampling(logp, [5] + [1] * 9) != 5     # seen in the window: draw from the rest
    assert ras_sampling(logp, [5] + [1] * 10) == 5    # out of the 10-token window again
    state = torch.random.get_rng_state()
    draws = [ras_sampling(torch.zeros(6564), [], generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert draws[0] == draws[1] and torch.equal(state, torch.random.get_rng_state())
    assert greedy_sampling(logp, []) == 5


# ----- full-size layout and loading ------------------------------------------------------------
def test_full_size_keys_and_shapes_match_manifest():
    manifest = json.loads(need(MANIFESTS / "llm.pt.keys.json", "llm manifest").read_text())
    with torch.device("meta"):
        lm = TextSpeechLM(get_config("cosyvoice2_0p5b").lm, text_vocab_size=151936)
    state = lm.state_dict()
    assert list(state) == list(manifest)
    assert {k: list(v.shape) for k, v in state.items()} == {k: v[0] for k, v in manifest.items()}


def test_build_from_qwen_config_json_alone(tmp_path):
    folder = need(GOLDEN / "CosyVoice-BlankEN-tiny", "golden Qwen folder")
    shutil.copy(folder / "config.json", tmp_path / "config.json")   # no model.safetensors
    lm = TextSpeechLM.from_qwen_folder(tmp_path)
    assert lm.text_vocab_size == 1000 and lm.cfg.hidden_size == 64 and lm.cfg.num_hidden_layers == 2
    with pytest.raises(FileNotFoundError):
        TextSpeechLM.from_qwen_folder(tmp_path / "absent")


def test_bad_checkpoint_gives_readable_error(golden_lm, tmp_path):
    state = dict(golden_lm.state_dict())
    state["llm_decoder.weights"] = state.pop("llm_decoder.weight")
    state["speech_embedding.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError) as err:
        load_official_llm(state, qwen_dir=GOLDEN / "CosyVoice-BlankEN-tiny")
    msg = str(err.value)
    assert "missing keys (1):\n    llm_decoder.weight" in msg
    assert "unexpected keys (1):\n    llm_decoder.weights" in msg
    assert "speech_embedding.weight: checkpoint (10, 64) vs model (6564, 64)" in msg
    with pytest.raises(FileNotFoundError):
        load_official_llm(tmp_path / "llm.pt", cfg=TINY)
    with pytest.raises(ValueError, match="needs a module"):
        load_official_llm(golden_lm.state_dict())


def test_load_from_lmconfig_and_half_precision(golden_lm, fx):
    cfg = dataclasses.replace(TINY, hidden_size=64, intermediate_size=128)
    half = load_official_llm(GOLDEN / "llm.pt", cfg=cfg, dtype=torch.bfloat16)
    assert half.text_vocab_size == 1000 and half.llm_decoder.weight.dtype == torch.bfloat16
    logp, _ = half.step(fx["lm_input"].bfloat16())
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, fx["kv_step_logp"][0], atol=0.3, rtol=0)


# ----- inference modes on a tiny random model --------------------------------------------------
def _feeds(lm: TextSpeechLM, monkeypatch) -> list[torch.Tensor]:
    """Record the rows of every forward step."""
    fed, step = [], lm.step
    monkeypatch.setattr(lm, "step", lambda rows, cache=None: (fed.append(rows[0]), step(rows, cache))[1])
    return fed


def _speak_then_stop(after: int):
    """Sampler: id 7 until ``after`` ids were generated, then EOS wherever EOS is allowed."""
    return lambda logp, history: EOS if len(history) >= after and logp[EOS] > -float("inf") else 7


def test_non_streaming_icl_and_sft(tiny_lm):
    text, prompt_text, prompt_speech = [3, 4, 5, 6], [1, 2], list(range(10))
    gen = torch.Generator().manual_seed(0)
    icl = list(tiny_lm.inference(text, prompt_text, prompt_speech, generator=gen, max_token_text_ratio=5))
    sft = list(tiny_lm.inference(torch.tensor([text]), generator=gen, max_token_text_ratio=5))
    for out in (icl, sft):
        assert len(out) <= 20 and all(0 <= t < EOS for t in out)
    assert len(list(tiny_lm.inference(text, sampling=_speak_then_stop(0)))) == 8        # min_len = 2 x 4
    assert len(list(tiny_lm.inference(text, prompt_text, sampling=lambda lp, h: 7))) == 80  # max_len = 20 x 4
    again = list(tiny_lm.inference(text, prompt_text, prompt_speech, generator=torch.Generator().manual_seed(0),
                                   max_token_text_ratio=5))
    assert again == icl
    with pytest.raises(ValueError, match="text: ids must lie in"):
        tiny_lm.inference([3, 1000])
    with pytest.raises(ValueError, match="sampling must be"):
        tiny_lm.inference(text, sampling="beam")


def test_streaming_sft_interleaves_text_every_15_tokens(tiny_lm, monkeypatch):
    fed = _feeds(tiny_lm, monkeypatch)
    out = list(tiny_lm.inference_bistream(torch.arange(12), sampling=_speak_then_stop(40)))
    assert len(out) == 38 and FILL not in out and EOS not in out
    # sos + 5 text, 15 speech (the 15th predicts the forced fill), 5 text, 15 speech, rest text + task_id, ...
    assert [len(r) for r in fed] == [6] + [1] * 15 + [5] + [1] * 15 + [3] + [1] * 8
    lm = tiny_lm
    with torch.no_grad():
        torch.testing.assert_close(fed[16], lm.embed_text(torch.arange(5, 10)))
        torch.testing.assert_close(fed[32], torch.cat([lm.embed_text([10, 11]), lm._special(1)]))


def test_streaming_sampled_fill_fetches_text_and_restarts_the_count(tiny_lm, monkeypatch):
    fed = _feeds(tiny_lm, monkeypatch)
    stop = _speak_then_stop(40)
    sampler = lambda lp, h: FILL if len(h) == 3 else stop(lp, h)  # noqa: E731
    out = list(tiny_lm.inference_bistream(torch.arange(12), sampling=sampler))
    assert len(out) == 38 and FILL not in out
    # fill sampled after 3 tokens: 5 more text ids, then the next forced fill 15 tokens later
    assert [len(r) for r in fed] == [6] + [1] * 3 + [5] + [1] * 15 + [3] + [1] * 20


def test_streaming_icl_from_a_text_generator(tiny_lm, monkeypatch):
    pulled = []

    def chunks():
        for chunk in ([10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20, 21]):
            pulled.append(chunk)
            yield torch.tensor([chunk])

    fed = _feeds(tiny_lm, monkeypatch)
    stream = tiny_lm.inference_bistream(chunks(), [1, 2, 3, 4, 5, 6], list(range(20)), sampling=_speak_then_stop(40))
    first = next(stream)
    assert len(pulled) == 2 and first == 7             # lazily: decoding starts before the text is complete
    out = [first] + list(stream)
    assert len(out) == 38
    # prompt: sos, 5 text, 15 speech, 5 text, 5 speech -> 10 more tokens complete the group, then a fill
    assert [len(r) for r in fed] == [31] + [1] * 10 + [5] + [1] * 15 + [4] + [1] * 13
    lm = tiny_lm
    with torch.no_grad():
        expected = torch.cat([lm._special(0), lm.embed_text([1, 2, 3, 4, 5]), lm.embed_speech(range(15)),
                              lm.embed_text([6, 10, 11, 12, 13]), lm.embed_speech(range(15, 20))])
    torch.testing.assert_close(fed[0], expected)


def test_streaming_keeps_prompt_speech_that_text_could_not_cover(tiny_lm, monkeypatch):
    fed = _feeds(tiny_lm, monkeypatch)
    out = list(tiny_lm.inference_bistream([[7, 8]], [1, 2], list(range(20)), sampling=_speak_then_stop(3),
                                           min_token_text_ratio=0))
    assert len(out) == 3
    assert len(fed[0]) == 1 + 4 + 1 + 20                 # sos, all text, task_id, all prompt speech


def test_streaming_modes_run_with_ras(tiny_lm):
    for prompt in ((None, None), ([1, 2, 3, 4, 5, 6], list(range(20)))):
        out = list(tiny_lm.inference_bistream(iter([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]), *prompt,
                                              generator=torch.Generator().manual_seed(1), max_token_text_ratio=3))
        assert len(out) <= 30 and all(0 <= t < EOS for t in out)


def test_tiny_preset_builds():
    cfg = get_config("tiny")
    lm = TextSpeechLM(cfg.lm, cfg.text.vocab_size)
    assert lm.llm_decoder.out_features == 6564 and lm.text_vocab_size == cfg.text.vocab_size


@pytest.mark.parametrize("stop", [6561, 6562, 6563])
def test_min_len_masks_every_stop_id(stop):
    """An LM that prefers a stop id still speaks min_len tokens: 6562 and 6563 end generation
    like EOS, so all three are masked before min_len (the official code masks only 6561)."""
    torch.manual_seed(0)
    lm = TextSpeechLM(get_config("tiny").lm, 100).eval()
    with torch.no_grad():
        lm.llm_decoder.bias[stop] = 100.0              # every step's favourite is this stop id
    tokens = list(lm.inference([5, 6, 7], sampling="greedy", min_token_text_ratio=2.0))
    assert len(tokens) == 6 and all(t < 6561 for t in tokens)


def test_streaming_decode_has_the_same_minimum_length():
    """Text-in streaming (bistream) cannot stop before min_token_text_ratio x len(text) either."""
    torch.manual_seed(0)
    lm = TextSpeechLM(get_config("tiny").lm, 100).eval()
    with torch.no_grad():
        lm.llm_decoder.bias[6561] = 100.0              # EOS is every step's favourite
    chunks = iter([torch.tensor([5, 6]), torch.tensor([7])])     # shorter than N: all decoded at the end
    tokens = list(lm.inference_bistream(chunks, sampling="greedy", min_token_text_ratio=2.0))
    assert len(tokens) == 6 and all(t < 6561 for t in tokens)


@pytest.mark.parametrize("units,folder", [("bpe", "text_tokenizer"), ("phone", "text_units")])
def test_length_bounds_fit_the_corpus_for_each_kind_of_text_unit(corpus_root, units, folder):
    """Every utterance's speech length (25 Hz) lies within the LM's decoding bounds for its text
    units: a minimum above the data would force the LM to speak past its end (the BPE minimum of
    2 tokens per id is above most phone-unit utterances). And the streaming layout's mix ratio
    admits nearly every utterance to bistream training (speech/text > M/N, the official rule),
    where the paper's 5:15 would admit no phone-unit English utterance at all."""
    from minicosy.data import load_manifest
    from minicosy.text_tokenizer import load_text_tokenizer

    tok = load_text_tokenizer(ROOT / "data" / "checkpoints" / folder)
    low, high = UNIT_TOKEN_TEXT_RATIO[units]
    ratios = [25 * r["duration"] / len(ids) for r in load_manifest(corpus_root) if r["lang"] == "en"
              for ids in [tok.encode(r["text"], normalize=True)] if ids]
    assert len(ratios) > 100 and low <= min(ratios) and max(ratios) <= high
    if units == "phone":
        assert sum(x < UNIT_TOKEN_TEXT_RATIO["bpe"][0] for x in ratios) > len(ratios) / 2
    n, m = UNIT_MIX_RATIO[units]
    assert sum(x > m / n for x in ratios) > 0.9 * len(ratios)
    if units == "phone":
        assert sum(x > 15 / 5 for x in ratios) < 0.05 * len(ratios)
    cfg = lm_for_units(get_config("tiny").lm, units)
    assert (cfg.min_token_text_ratio, cfg.max_token_text_ratio, cfg.mix_ratio) == (low, high, (n, m))
    with pytest.raises(ValueError, match="text units"):
        lm_for_units(cfg, "letters")

