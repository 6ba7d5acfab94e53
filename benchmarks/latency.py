"""Per-stage latency of minicosy and, in the same run, of the official CosyVoice 2 code (§2.5, eq. 11).

    python benchmarks/latency.py                              # full-size stages (random weights) + the tiny model
    python benchmarks/latency.py --official ~/src/CosyVoice   # the same stages of both codes, same weights
    python benchmarks/latency.py --size tiny --skip-e2e       # seconds
    python benchmarks/latency.py --device cuda --threads 8

Stages (random weights, fp32, the official fixed noise): the LM prefill of 150 rows; LM decode per
token with the KV cache after that prefix (minicosy also with its static cache); flow.inference on
50 tokens without prompt (10 NFE, CFG); the first streaming flow chunk (28 tokens after a 75-token
prompt; minicosy also incremental and with a registered prompt); HiFT on 2 s of mel. Next to the
decode time: its memory-bandwidth floor, the weight bytes one step reads (fp32 and bf16) over a
measured copy bandwidth (``minicosy.speed``).

``--official PATH`` imports a user's own checkout of FunAudioLLM/CosyVoice (never vendored: PATH and
its ``third_party/Matcha-TTS`` go on ``sys.path``; it needs the official requirements), builds the
official classes from the ``cosyvoice2.yaml`` minicosy writes for the chosen size
(``official.yaml_text``: the official recipe's model part), loads their random weights strictly into
minicosy's modules, and times both codes stage by stage, alternating which one goes first: min and
median of each, the ratio minicosy/official and the largest |difference| of their outputs. Two
departures from the official calls, neither changing the work: the Qwen2 backbone is built from its
config (``from_pretrained`` would load BlankEN weights that ``llm.pt`` overwrites anyway), and decode
steps get an attention mask over past + current positions (NOTES.md §9: transformers >= 4.57 misreads
the official one-position mask). ``--size tiny`` uses the tiny preset with the official encoder's 4
up-sampled blocks, its hard-coded 512-channel look-ahead and up-sampling layers rebuilt at the tiny
width (as the golden fixtures were made).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import tempfile
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2ForCausalLM

from minicosy.config import MiniCosyConfig, get_config
from minicosy.flow import CausalMaskedDiffWithXvec, FlowStreamer, load_flow_state_dict, prompt_state
from minicosy.hift import load_official_hift
from minicosy.lm import TextSpeechLM, load_official_llm, qwen2_config
from minicosy.official import EXTRA, random_full_size, read_yaml, yaml_text
from minicosy.pipeline import CosyVoice2, eq11_latency
from minicosy.speed import clock, copy_bandwidth, decode_floor, repeat, summary, synchronizer

SIZES = {"full": "cosyvoice2_0p5b", "tiny": "tiny"}
OFFICIAL_UP_BLOCKS = 4       # hard-coded in the official UpsampleConformerEncoder


def bench_config(size: str) -> MiniCosyConfig:
    """The preset of ``size`` with the official encoder's fixed number of up-sampled blocks."""
    cfg = get_config(SIZES[size])
    cfg.flow = replace(cfg.flow, up_encoder_blocks=OFFICIAL_UP_BLOCKS)
    return cfg


# ---- the official code, from a user's checkout ------------------------------------------------------
def import_official(path: str | Path) -> None:
    """Put a checkout of FunAudioLLM/CosyVoice (and its Matcha-TTS submodule) on ``sys.path``."""
    path = Path(path).expanduser().resolve()
    if not (path / "cosyvoice" / "flow" / "flow.py").is_file():
        raise FileNotFoundError(f"{path} is not a checkout of FunAudioLLM/CosyVoice (no cosyvoice/flow/flow.py)")
    for entry in (path / "third_party" / "Matcha-TTS", path):
        sys.path.insert(0, str(entry))


def instantiate(node):
    """Build a ``read_yaml`` node as HyperPyYAML would: ``!new:`` calls the class with the node's
    arguments, ``!name:`` binds them to the function; omegaconf's DictConfig becomes a namespace (the
    official CFM only reads its attributes)."""
    if isinstance(node, list):
        return [instantiate(v) for v in node]
    if not isinstance(node, dict):
        return node
    kwargs = {k: instantiate(v) for k, v in node.items() if k != "_tag"}
    if "_tag" not in node:
        return kwargs
    kind, _, target = node["_tag"].partition(":")
    if target == "omegaconf.DictConfig":
        return types.SimpleNamespace(**kwargs["content"])
    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    return obj(**kwargs) if kind == "new" else functools.partial(obj, **kwargs)


def build_official(cfg: MiniCosyConfig, text_vocab_size: int) -> dict[str, torch.nn.Module]:
    """The official ``llm``, ``flow`` and ``hift`` modules for ``cfg`` (random weights, eval mode)."""
    from cosyvoice.llm.llm import Qwen2Encoder
    from cosyvoice.transformer.upsample_encoder import PreLookaheadLayer, Upsample1D

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cosyvoice2.yaml").write_text(yaml_text(cfg))
        doc = read_yaml(Path(tmp) / "cosyvoice2.yaml")
    qwen = Qwen2Encoder.__new__(Qwen2Encoder)        # its __init__ would load BlankEN weights
    torch.nn.Module.__init__(qwen)
    qwen.model = Qwen2ForCausalLM(qwen2_config(cfg.lm, text_vocab_size))
    doc["llm"]["llm"] = qwen
    llm, flow, hift = (instantiate(doc[k]) for k in ("llm", "flow", "hift"))
    f, extra = cfg.flow, doc.get(EXTRA, {}).get("flow", {})
    if f.up_encoder_blocks != OFFICIAL_UP_BLOCKS:
        raise ValueError(f"the official encoder has {OFFICIAL_UP_BLOCKS} up-sampled blocks, not {f.up_encoder_blocks}")
    if "pre_lookahead_channels" in extra:
        flow.encoder.pre_lookahead_layer = PreLookaheadLayer(in_channels=f.encoder_size, channels=f.pre_lookahead_channels,
                                                             pre_lookahead_len=f.pre_lookahead_len)
    if "upsample_channels" in extra:
        flow.encoder.up_layer = Upsample1D(channels=f.encoder_size, out_channels=f.upsample_channels,
                                           stride=f.token_mel_ratio)
    return {"llm": llm.eval(), "flow": flow.eval(), "hift": hift.eval()}


def minicosy_twins(cfg: MiniCosyConfig, official: dict[str, torch.nn.Module], text_vocab_size: int) -> dict:
    """minicosy's modules holding the official modules' weights, loaded strictly by the official loaders."""
    lm = load_official_llm(official["llm"].state_dict(), TextSpeechLM(cfg.lm, text_vocab_size))
    flow = CausalMaskedDiffWithXvec(cfg.flow)
    load_flow_state_dict(flow, official["flow"].state_dict())
    return {"lm": lm, "flow": flow.eval(), "hift": load_official_hift(official["hift"].state_dict(), cfg.hift)}


# ---- the stages ---------------------------------------------------------------------------------------
def official_logp(llm, rows: torch.Tensor, cache, past: int):
    """The official step (``forward_one_step`` + ``llm_decoder`` + log-softmax); mask over past + current."""
    masks = torch.ones(1, 1, past + rows.shape[1], dtype=torch.bool, device=rows.device)
    hidden, cache = llm.llm.forward_one_step(rows, masks, cache=cache)
    return llm.llm_decoder(hidden[:, -1]).log_softmax(dim=-1)[0], cache


def compare(ours, theirs, repeats: int, sync) -> dict:
    """Both sides timed ``repeats`` times after a warm-up each, alternating which goes first."""
    outputs = {"minicosy": ours(), "official": theirs()}
    times: dict[str, list[float]] = {"minicosy": [], "official": []}
    for r in range(repeats):
        order = [("official", theirs), ("minicosy", ours)]
        for side, fn in order if r % 2 == 0 else order[::-1]:
            times[side].append(clock(fn, sync)[0])
    return rows_of(times, outputs)


def rows_of(times: dict[str, list[float]], outputs: dict[str, torch.Tensor]) -> dict:
    row = {side: summary(t) for side, t in times.items()}
    for stat in ("min", "median"):
        row[f"ratio_{stat}"] = row["minicosy"][stat] / row["official"][stat]
    row["max_abs_diff"] = float((outputs["minicosy"].float() - outputs["official"].float()).abs().max())
    return row


@torch.inference_mode()
def lm_stages(lm: TextSpeechLM, official, device, steps: int, repeats: int, sync) -> dict:
    """Prefill of 150 rows, then ``steps`` decode steps on forced tokens (the arg-max of minicosy's
    log-probs), each step timed for both codes, which goes first alternating from step to step;
    minicosy's static cache alongside."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(1, 150, lm.cfg.hidden_size, generator=g).to(device)
    out = {}
    prefill = lambda: lm.step(rows)[0]
    if official is None:
        out["LM prefill, 150 rows"] = {"minicosy": repeat(prefill, repeats, sync)}
    else:
        out["LM prefill, 150 rows"] = compare(prefill, lambda: official_logp(official, rows, None, 0)[0], repeats, sync)
    logp, cache = lm.step(rows)
    static = lm.llm.static_cache(rows.shape[1] + steps)
    lm.step(rows, static)
    theirs = official_logp(official, rows, None, 0)[1] if official is not None else None
    times: dict[str, list[float]] = {"minicosy": [], "official": [], "static": []}
    diff = 0.0
    for k in range(steps):
        row = lm.speech_embedding.weight[int(logp.argmax()) % lm.cfg.speech_token_size].reshape(1, 1, -1)
        sides = {"minicosy": lambda: lm.step(row, cache), "static": lambda: lm.static_step(row, static)}
        if official is not None:
            sides["official"] = lambda: official_logp(official, row, theirs, rows.shape[1] + k)
        done = {}
        for side in sorted(sides, reverse=bool(k % 2)):          # official before / after minicosy
            t, done[side] = clock(sides[side], sync)
            times[side].append(t)
        logp, cache = done["minicosy"]
        if official is not None:
            their_logp, theirs = done["official"]
            diff = max(diff, float((logp - their_logp).abs().max()))
    times = {side: t[2:] for side, t in times.items() if t}            # the first steps warm up
    name = "LM decode per token, 150-row prefix"
    if official is None:
        out[name] = {"minicosy": summary(times["minicosy"])}
    else:
        out[name] = rows_of({s: times[s] for s in ("minicosy", "official")}, {"minicosy": logp, "official": their_logp})
        out[name]["max_abs_diff"] = diff
    out["LM decode per token, static cache (minicosy)"] = {"minicosy": summary(times["static"])}
    return out


@torch.inference_mode()
def flow_hift_stages(flow, hift, official: dict | None, device, repeats: int, sync) -> dict:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 192, generator=g).to(device)
    tok50 = torch.randint(0, 6561, (1, 50), generator=g).to(device)
    none = torch.zeros(1, 0, dtype=torch.long, device=device), torch.zeros(1, 0, 80, device=device)
    prompt = torch.randint(0, 6561, (1, 75), generator=g).to(device), torch.randn(1, 150, 80, generator=g).to(device)
    tok28 = torch.randint(0, 6561, (1, 28), generator=g).to(device)
    mel = torch.randn(1, 80, 100, generator=g).to(device) - 5
    ours = {"flow 50 tokens, no prompt, 10 NFE + CFG": lambda: flow.inference(tok50, *none, emb),
            "flow first streaming chunk, 28 tokens after 75": lambda: FlowStreamer(flow, *prompt, emb).chunk(tok28),
            "HiFT 2 s of mel": lambda: hift.inference(mel, generator=torch.Generator(device).manual_seed(0))[0]}
    out = {}
    if official is None:
        out = {name: {"minicosy": repeat(fn, repeats, sync)} for name, fn in ours.items()}
    else:
        oflow, ohift = official["flow"], official["hift"]
        n = lambda t: torch.tensor([t.shape[1]], device=device)

        def official_flow(token, p_token, p_feat, streaming, finalize):
            return oflow.inference(token, n(token), p_token, n(p_token), p_feat, n(p_feat), emb, streaming, finalize)[0]

        def official_hift():
            torch.manual_seed(0)                      # the official source draws from the global generator
            return ohift.inference(speech_feat=mel)[0]

        theirs = [lambda: official_flow(tok50, *none, False, True), lambda: official_flow(tok28, *prompt, True, False),
                  official_hift]
        out = {name: compare(fn, other, repeats, sync) for (name, fn), other in zip(ours.items(), theirs)}
    out["flow first streaming chunk, incremental (minicosy)"] = {"minicosy": repeat(
        lambda: FlowStreamer(flow, *prompt, emb, incremental=True).chunk(tok28), repeats, sync)}
    state = prompt_state(flow, *prompt, emb)          # add_zero_shot_spk computes this once per speaker
    out["flow first streaming chunk, registered prompt (minicosy)"] = {"minicosy": repeat(
        lambda: FlowStreamer(flow, *prompt, emb, incremental=True, state=state).chunk(tok28), repeats, sync)}
    return out


@torch.inference_mode()
def stream_total(flow, device, incremental: bool, n_tokens: int = 250) -> dict[str, float]:
    """Flow seconds to stream ``n_tokens`` after a 75-token prompt (all chunks and the final call)."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 6561, (1, 75), generator=g).to(device), torch.randn(1, 150, 80, generator=g).to(device)
    emb, token = torch.randn(1, 192, generator=g).to(device), torch.randint(0, 6561, (1, n_tokens), generator=g).to(device)
    s = FlowStreamer(flow, *prompt, emb, incremental=incremental)

    def stream() -> int:
        frames = 0
        while token.shape[1] >= s.needed:
            frames += s.chunk(token).shape[2]
        return frames + s.finish(token).shape[2]

    seconds, frames = clock(stream, synchronizer(device))
    return {"seconds": seconds, "frames": frames, "cache_MB": s.cache_bytes() / 2**20}


def tiny_end_to_end(device: torch.device) -> dict:
    """The trained tiny model on a corpus-free prompt (a synthetic vowel): the request's own timings."""
    tts = CosyVoice2.from_pretrained("tiny", device=device)
    t = np.arange(24000 * 3) / 24000
    vowel = (0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    text = "The weather is nice today, so we will walk to the park and have a picnic by the lake."
    results = {}
    for stream in (False, True):
        tot = list(tts.inference_cross_lingual(text, (vowel, 24000), stream=stream, seed=0))[-1]["totals"]
        results[f"tiny {'stream' if stream else 'offline'}"] = {**tot, "eq11": eq11_latency(tot, 25)}
        print(f"tiny model, {'streaming' if stream else 'offline'}: LM {tot['lm_s']:.3f} s, flow {tot['flow_s']:.3f} s, "
              f"vocoder {tot['vocoder_s']:.3f} s, front-end {tot['frontend_s']:.3f} s for {tot['audio_s']:.2f} s of "
              f"audio; RTF {tot['rtf']:.3f}; first package {tot['first_package_s']:.3f} s")
    return results


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'stage':56s} {'minicosy min / median':>23s} {'official min / median':>23s} {'ratio':>11s} {'max |diff|':>10s}")
    for name, r in rows.items():
        ours = f"{r['minicosy']['min']:10.4f} / {r['minicosy']['median']:.4f}"
        theirs = f"{r['official']['min']:10.4f} / {r['official']['median']:.4f}" if "official" in r else ""
        ratio = f"{r['ratio_min']:.2f} / {r['ratio_median']:.2f}" if "official" in r else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"{name:56s} {ours:>23s} {theirs:>23s} {ratio:>11s} {diff:>10s}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", help="a checkout of FunAudioLLM/CosyVoice: time its code in the same run")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=30)
    p.add_argument("--skip-e2e", action="store_true", help="leave out the tiny model's end-to-end requests")
    p.add_argument("--skip-stream-total", action="store_true", help="leave out streaming 250 tokens")
    p.add_argument("--json", help="write all measurements here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.decode_steps < 3:
        raise ValueError("need --repeats >= 1 and --decode-steps >= 3")
    torch.set_num_threads(args.threads)
    device, sync = torch.device(args.device), synchronizer(args.device)
    results: dict = {"device": str(device), "threads": args.threads, "torch": torch.__version__, "size": args.size}
    if not args.skip_e2e:
        results.update(tiny_end_to_end(device))
    cfg = bench_config(args.size)
    vocab = cfg.text.vocab_size
    t0 = time.perf_counter()
    official = None
    if args.official:
        import_official(args.official)
        official = {k: m.to(device) for k, m in build_official(cfg, vocab).items()}
        ours = minicosy_twins(cfg, official, vocab)
    else:
        ours = random_full_size(cfg, vocab, parts=("lm", "flow", "hift"))
    lm, flow, hift = (ours[k].to(device) for k in ("lm", "flow", "hift"))
    print(f"\n{args.size}-size random modules built in {time.perf_counter() - t0:.1f} s"
          + (f" (official code from {args.official}, its weights loaded into minicosy's modules)" if official else ""))
    rows = lm_stages(lm, official and official["llm"], device, args.decode_steps, args.repeats, sync)
    rows.update(flow_hift_stages(flow, hift, official, device, args.repeats, sync))
    print_table(f"{args.size}-size CosyVoice2 architecture, random weights, fp32, {device}, {args.threads} threads; "
                f"seconds", rows)
    bandwidth = copy_bandwidth(device)
    floor = decode_floor(lm, bandwidth)
    decode = rows["LM decode per token, 150-row prefix"]["minicosy"]["median"]
    print(f"\nLM decode floor: one step reads {floor['fp32_bytes'] / 1e9:.3f} GB of weights in fp32 "
          f"({floor['bf16_bytes'] / 1e9:.3f} GB in bf16); at the measured copy bandwidth of {bandwidth / 1e9:.1f} GB/s "
          f"that takes {floor['fp32_s']:.4f} s ({floor['bf16_s']:.4f} s in bf16), against {decode:.4f} s measured")
    results.update(stages=rows, decode_floor={**floor, "copy_bandwidth_Bps": bandwidth})
    if not args.skip_stream_total:
        rec, inc = stream_total(flow, device, False), stream_total(flow, device, True)
        print(f"\nflow streaming 250 tokens after a 75-token prompt: recompute (official orchestration) "
              f"{rec['seconds']:.1f} s, incremental {inc['seconds']:.1f} s (ratio {inc['seconds'] / rec['seconds']:.2f}); "
              f"the incremental caches hold {inc['cache_MB']:.0f} MB for {inc['frames'] + 150} mel frames")
        results["stream_total"] = {"recompute": rec, "incremental": inc}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
