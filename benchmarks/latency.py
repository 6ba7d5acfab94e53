"""Per-stage latency of minicosy against the official CosyVoice 2 code, side by side.

    python benchmarks/latency.py                  # tiny model + full-size random weights (CPU, 2 threads)
    python benchmarks/latency.py --device cuda    # on a GPU (the official figures are CPU-only)
    python benchmarks/latency.py --skip-full      # the tiny model only (seconds)

The official figures (../shared/reference/timings_cpu_fullsize.json) were measured on this machine
kind with 2 threads, fp32 and random full-size weights, under the same conditions as the runs here:
LM decode per token with the KV cache after a 150-token prefix; flow.inference on 50 tokens without
prompt (10 NFE, CFG); the first streaming flow chunk (28 tokens after a 75-token prompt); HiFT on 2 s
of mel. Ratio = minicosy / official (target ≤ 0.8). The first streaming chunk is timed three ways:
as the official code runs it, with the incremental flow (same work for a first chunk), and for a
speaker registered with ``add_zero_shot_spk`` (its prompt's leading chunks computed once). The
last rows compare the official recompute-everything streaming with the incremental flow on 250
tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minicosy.config import get_config
from minicosy.flow import FlowStreamer, prompt_state
from minicosy.official import random_full_size
from minicosy.pipeline import CosyVoice2, eq11_latency

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "timings_cpu_fullsize.json"


def timed(fn, repeats: int, sync=lambda: None) -> dict[str, float]:
    fn()                                                        # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"min": min(times), "median": statistics.median(times)}


@torch.inference_mode()
def lm_decode(lm, device, prefix: int = 150, steps: int = 30) -> dict[str, float]:
    """Seconds per decoded token (forward + head + log-softmax) after a ``prefix``-row prefill."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(1, prefix, lm.cfg.hidden_size, generator=g).to(device, next(lm.parameters()).dtype)
    _, cache = lm.step(rows)
    times, token = [], 0
    for _ in range(steps):
        t = time.perf_counter()
        logp, cache = lm.step(lm.speech_embedding.weight[token].reshape(1, 1, -1), cache)
        token = int(logp.argmax()) % lm.cfg.speech_token_size
        times.append(time.perf_counter() - t)
    times = times[2:]
    return {"min": min(times), "median": statistics.median(times)}


def flow_cases(flow, device, repeats: int, sync) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    dtype = next(flow.parameters()).dtype
    emb = torch.randn(1, 192, generator=g).to(device, dtype)
    tok50 = torch.randint(0, 6561, (1, 50), generator=g).to(device)
    none = torch.zeros(1, 0, dtype=torch.long, device=device), torch.zeros(1, 0, 80, device=device, dtype=dtype)
    prompt = torch.randint(0, 6561, (1, 75), generator=g).to(device), torch.randn(1, 150, 80, generator=g).to(device, dtype)
    tok28 = torch.randint(0, 6561, (1, 28), generator=g).to(device)
    out = {"flow 50 tokens, no prompt (s)": timed(lambda: flow.inference(tok50, *none, emb), repeats, sync)}
    out["flow first stream chunk, 75-token prompt (s)"] = timed(
        lambda: FlowStreamer(flow, *prompt, emb).chunk(tok28), repeats, sync)
    out["flow first stream chunk, incremental (s)"] = timed(
        lambda: FlowStreamer(flow, *prompt, emb, incremental=True).chunk(tok28), repeats, sync)
    state = prompt_state(flow, *prompt, emb)      # add_zero_shot_spk computes this once per speaker
    out["flow first stream chunk, registered prompt (s)"] = timed(
        lambda: FlowStreamer(flow, *prompt, emb, incremental=True, state=state).chunk(tok28), repeats, sync)
    return out


def stream_total(flow, device, incremental: bool, n_tokens: int = 250) -> dict[str, float]:
    """Flow seconds to stream ``n_tokens`` after a 75-token prompt (all chunks and the final call)."""
    g = torch.Generator().manual_seed(1)
    dtype = next(flow.parameters()).dtype
    prompt = torch.randint(0, 6561, (1, 75), generator=g).to(device), torch.randn(1, 150, 80, generator=g).to(device, dtype)
    emb, token = torch.randn(1, 192, generator=g).to(device, dtype), torch.randint(0, 6561, (1, n_tokens), generator=g).to(device)
    s = FlowStreamer(flow, *prompt, emb, incremental=incremental)
    t = time.perf_counter()
    frames = 0
    while token.shape[1] >= s.needed:
        frames += s.chunk(token).shape[2]
    frames += s.finish(token).shape[2]
    return {"seconds": time.perf_counter() - t, "frames": frames, "cache_MB": s.cache_bytes() / 2**20}


def hift_2s(hift, device, repeats: int, sync) -> dict[str, float]:
    mel = torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(0)).to(device) - 5
    return timed(lambda: hift.inference(mel), repeats, sync)


def print_rows(title: str, rows: dict[str, dict[str, float]], official: dict[str, float | None]) -> None:
    print(f"\n{title}")
    print(f"{'stage':48s} {'min':>9s} {'median':>9s} {'official':>9s} {'ratio':>7s}")
    for name, r in rows.items():
        ref = official.get(name)
        ratio = f"{r['min'] / ref:7.2f}" if ref else "      -"
        print(f"{name:48s} {r['min']:9.3f} {r['median']:9.3f} {f'{ref:9.3f}' if ref else '        -'} {ratio}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-stream-total", action="store_true")
    p.add_argument("--json", help="write all measurements here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ref = json.loads(OFFICIAL.read_text()) if OFFICIAL.exists() else {}
    official = {"LM decode per token (s)": ref.get("llm_decode_per_token_s_run2_no_sampling", {}).get("min"),
                "flow 50 tokens, no prompt (s)": ref.get("flow_50tok_noprompt_nonstream_s", {}).get("min"),
                "flow first stream chunk, 75-token prompt (s)": ref.get("flow_28tok_first_chunk_with_75tok_prompt_stream_s", {}).get("min"),
                "flow first stream chunk, incremental (s)": ref.get("flow_28tok_first_chunk_with_75tok_prompt_stream_s", {}).get("min"),
                "flow first stream chunk, registered prompt (s)": ref.get("flow_28tok_first_chunk_with_75tok_prompt_stream_s", {}).get("min"),
                "HiFT 2 s of mel (s)": ref.get("hift_2s_mel100_s", {}).get("min")}
    results: dict = {"device": str(device), "threads": args.threads, "torch": torch.__version__}

    # tiny model, end to end on a corpus-free prompt (a synthetic vowel), the request's own timings
    tts = CosyVoice2.from_pretrained("tiny", device=device)
    t = torch.arange(24000 * 3) / 24000
    vowel = (0.3 * torch.sin(2 * torch.pi * 140 * t) * (1 + 0.5 * torch.sin(2 * torch.pi * 3 * t))).numpy()
    text = "The weather is nice today, so we will walk to the park and have a picnic by the lake."
    for stream in (False, True):
        outs = list(tts.inference_cross_lingual(text, (vowel, 24000), stream=stream, seed=0))
        tot = outs[-1]["totals"]
        results[f"tiny {'stream' if stream else 'offline'}"] = {**tot, "eq11": eq11_latency(tot, 25)}
        print(f"tiny model, {'streaming' if stream else 'offline'}: LM {tot['lm_s']:.3f} s, flow {tot['flow_s']:.3f} s, "
              f"vocoder {tot['vocoder_s']:.3f} s, front-end {tot['frontend_s']:.3f} s for {tot['audio_s']:.2f} s of audio; "
              f"RTF {tot['rtf']:.3f}; first package {tot['first_package_s']:.3f} s; "
              f"eq. 11 with M=25: {eq11_latency(tot, 25)['L_TTS']:.3f} s")
    if args.skip_full:
        return
    t0 = time.perf_counter()
    full = random_full_size(get_config("cosyvoice2_0p5b"), parts=("lm", "flow", "hift"))
    print(f"\nfull-size random modules built in {time.perf_counter() - t0:.1f} s")
    lm, flow, hift = (full[k].to(device) for k in ("lm", "flow", "hift"))
    rows = {"LM decode per token (s)": lm_decode(lm, device)}
    rows.update(flow_cases(flow, device, args.repeats, sync))
    rows["HiFT 2 s of mel (s)"] = hift_2s(hift, device, args.repeats, sync)
    print_rows(f"full-size CosyVoice2-0.5B architecture, random weights, {device}, {args.threads} threads", rows, official)
    results["full"] = rows
    if not args.skip_stream_total:
        rec, inc = stream_total(flow, device, False), stream_total(flow, device, True)
        print(f"\nflow streaming 250 tokens after a 75-token prompt: recompute (official) {rec['seconds']:.1f} s, "
              f"incremental {inc['seconds']:.1f} s (ratio {inc['seconds'] / rec['seconds']:.2f}); "
              f"official code measured 63.5 s (timings_streaming_fullsize.json); the incremental caches hold "
              f"{inc['cache_MB']:.0f} MB for {inc['frames'] + 150} mel frames")
        results["stream_total"] = {"recompute": rec, "incremental": inc}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
