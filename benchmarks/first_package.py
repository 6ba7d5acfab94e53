"""First-package latency of streaming synthesis, stage by stage (§2.5, eq. 11), over many requests.

    python benchmarks/first_package.py                          # the tiny model, 20 requests
    python benchmarks/first_package.py --size full --device cuda --registered --incremental \\
        --static-cache --compile --dtype bf16 --hift-dtype bf16 --json out/first_package.json
    python benchmarks/first_package.py --model pretrained_models/CosyVoice2-0.5B --device cuda

Each request is the first package of a zero-shot streaming request, timed stage by stage on clocks
synchronised with the device:

1. front end: the text's ids and the prompt (speech tokens, mel, x-vector) — or, with
   ``--registered``, the speaker registered once with ``add_zero_shot_spk`` (and, with
   ``--incremental``, its prompt's leading flow chunks, computed once);
2. LM prefill: [sos, prompt text + text, task_id, prompt speech] in one forward, the first token;
3. LM steps: one token each, until the flow chunk has its M tokens (after the prompt pad that puts
   prompt + first hop on the hop grid) and the 3 look-ahead tokens;
4. the flow chunk: 10 Euler steps (NFE), each one estimator call on a batch of 2 (CFG, eq. 10);
5. HiFT on the chunk's mel (the streaming vocoder's first call: its last 8 frames' audio is held back).

Reported: median and p90 of each stage and of their sum (the first package), eq. 11 filled in with
the medians (d_lm per step, d_fm and d_voc per package token), and the steady-state real-time factor
(d_lm + d_fm + d_voc) × 25 tokens/s. With half precision (``--dtype``, ``--hift-dtype``) the first
request is also run in float32 and the differences go into the JSON (``parity``). ``--size full``
builds the CosyVoice2-0.5B architecture with random weights (no download; the tiny text tokenizer):
the timings are the real ones, the speech is noise.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from minicosy.config import get_config
from minicosy.flow import FlowStreamer, prompt_state
from minicosy.frontend import Frontend
from minicosy.hift import VocoderStream
from minicosy.official import random_full_size
from minicosy.pipeline import CosyVoice2, eq11_latency
from minicosy.speed import clock, summary, synchronizer

TEXT = "The weather is nice today, so we will walk to the park and have a picnic by the lake."
PROMPT_TEXT = "Hello there, this is my voice."
STAGES = ("frontend_s", "lm_prefill_s", "lm_steps_s", "flow_chunk_s", "hift_s")


def vowel(seconds: float = 3.0, rate: int = 24000) -> tuple[np.ndarray, int]:
    """A corpus-free prompt: a 140 Hz tone with a 3 Hz amplitude swell."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), rate


def build(args: argparse.Namespace, dtype: str | None, hift_dtype: str | None) -> CosyVoice2:
    """The pipeline to time: a model folder (``--model``) or the full-size architecture at random."""
    if args.size != "full":
        return CosyVoice2.from_pretrained(args.model, device=args.device, dtype=dtype, hift_dtype=hift_dtype)
    cfg = get_config("cosyvoice2_0p5b")
    parts = random_full_size(cfg, parts=("lm", "flow", "hift", "campplus", "speech_tokenizer"))
    tiny = CosyVoice2.from_pretrained("tiny")
    frontend = Frontend(tiny.frontend.text_tokenizer, parts["speech_tokenizer"], parts["campplus"],
                        cfg.features.sample_rate, cfg.flow.token_mel_ratio)
    return CosyVoice2(frontend, parts["lm"], parts["flow"], parts["hift"], cfg, device=args.device, dtype=dtype,
                      hift_dtype=hift_dtype)


class FirstPackage:
    """One configuration of the pipeline and the inputs of its requests."""

    def __init__(self, tts: CosyVoice2, args: argparse.Namespace) -> None:
        self.tts, self.args, self.sync = tts, args, synchronizer(tts.device)
        self.wav = vowel()
        self.registered = self.state = None
        if args.registered:
            tts.add_zero_shot_spk(PROMPT_TEXT, self.wav, "benchmark")
            self.registered = tts.spk2info["benchmark"]["prompt"]
            if args.incremental:
                self.state = prompt_state(tts.flow, *self._flow_prompt(self.registered))

    def _flow_prompt(self, prompt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev, dt = self.tts.device, self.tts.dtype
        return prompt.speech_token.to(dev), prompt.speech_feat.to(dev, dt), prompt.embedding.to(dev, dt)

    @torch.inference_mode()
    def request(self, seed: int) -> dict:
        """Seconds per stage of one first package, with what it produced."""
        tts, args, sync = self.tts, self.args, self.sync
        out: dict = {}

        def frontend():
            ids = tts.frontend.text_ids(TEXT)
            return ids, self.registered or tts.frontend.prompt(self.wav, PROMPT_TEXT)

        out["frontend_s"], (ids, prompt) = clock(frontend, sync)
        sc = tts.config.streaming
        streamer = FlowStreamer(tts.flow, *self._flow_prompt(prompt), hop=args.hop, max_hop=sc.token_max_hop_len,
                                scale=sc.stream_scale_factor, incremental=args.incremental, state=self.state)
        tokens = tts.lm.inference(ids, prompt.text_ids, prompt.speech_token[0], static_cache=args.static_cache,
                                  generator=torch.Generator(tts.device).manual_seed(seed))
        out["lm_prefill_s"], first = clock(lambda: next(tokens), sync)
        got = [first]
        steps = [clock(lambda: next(tokens, None), sync) for _ in range(streamer.needed - 1)]
        got += [token for _, token in steps]
        if None in got:
            raise RuntimeError(f"the LM stopped after {got.index(None)} tokens, before the first chunk's {streamer.needed}")
        out["lm_steps_s"], out["lm_steps"] = sum(t for t, _ in steps), len(steps)
        out["flow_chunk_s"], mel = clock(lambda: streamer.chunk(torch.tensor([got], device=tts.device)), sync)
        vocoder = VocoderStream(tts.hift, sc.mel_cache_len, sc.source_cache_len,
                                torch.Generator(tts.device).manual_seed(seed))
        out["hift_s"], speech = clock(lambda: vocoder(mel.float(), False), sync)
        out.update(first_package_s=sum(out[s] for s in STAGES), tokens=got, mel=mel, speech=speech,
                   package_tokens=streamer.offset, prompt_tokens=prompt.speech_token.shape[1])
        return out

    @torch.inference_mode()
    def replay(self, tokens: list[int]) -> dict:
        """The LM's log-probs along ``tokens`` (teacher-forced through the sampler), the flow chunk's
        mel and the package's audio (source drawn with seed 0) for exactly those tokens."""
        tts, sc, seen = self.tts, self.tts.config.streaming, []

        def forced(logp: torch.Tensor, history: list[int]) -> int:
            seen.append(logp.clone())
            return tokens[len(history)]

        prompt = self.registered or tts.frontend.prompt(self.wav, PROMPT_TEXT)
        lm = tts.lm.inference(tts.frontend.text_ids(TEXT), prompt.text_ids, prompt.speech_token[0], sampling=forced)
        list(itertools.islice(lm, len(tokens)))
        mel = FlowStreamer(tts.flow, *self._flow_prompt(prompt), hop=self.args.hop).chunk(
            torch.tensor([tokens], device=tts.device))
        speech = VocoderStream(tts.hift, sc.mel_cache_len, sc.source_cache_len,
                               torch.Generator(tts.device).manual_seed(0))(mel.float(), False)
        return {"logp": torch.stack(seen), "mel": mel.float(), "speech": speech}


def parity(half: FirstPackage, reference: FirstPackage, tokens: list[int]) -> dict[str, float]:
    """Half precision against float32 on the same tokens: the LM's log-probs (where finite: the stop
    ids are masked before the minimum length), the flow chunk's mel and the package's audio."""
    low, ref = half.replay(tokens), reference.replay(tokens)
    finite = torch.isfinite(ref["logp"])
    dl, dm, ds = (low["logp"] - ref["logp"])[finite].abs(), (low["mel"] - ref["mel"]).abs(), low["speech"] - ref["speech"]
    p = ref["logp"].exp()
    kl = (p * (ref["logp"] - low["logp"])).where(finite, 0).sum(-1).mean()
    return {"lm_logp_max_abs": float(dl.max()), "lm_kl": float(kl), "mel_max_abs": float(dm.max()),
            "mel_mean_abs": float(dm.mean()), "audio_max_abs": float(ds.abs().max()),
            "audio_rms_rel": float(ds.pow(2).mean().sqrt() / ref["speech"].pow(2).mean().sqrt())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a model folder (official or minicosy)")
    p.add_argument("--size", choices=["model", "full"], default="model",
                   help="'full': the CosyVoice2-0.5B architecture with random weights instead of --model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests first (compilation, allocator)")
    p.add_argument("--hop", type=int, default=15, help="M: new tokens in the first package")
    p.add_argument("--registered", action="store_true", help="a speaker registered once instead of a fresh prompt")
    p.add_argument("--incremental", action="store_true", help="the incremental streaming flow")
    p.add_argument("--static-cache", action="store_true", help="the LM decodes into a pre-allocated KV cache")
    p.add_argument("--compile", action="store_true", help="compile the LM's decode step (needs --static-cache)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' checks tracing only)")
    p.add_argument("--dtype", default=None, help="LM and flow: fp32 (default), bf16 or fp16")
    p.add_argument("--hift-dtype", default=None, help="HiFT's convolutions: fp32 (default), bf16 or fp16")
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.hop < 1:
        raise ValueError("need --requests >= 1, --warmup >= 0 and --hop >= 1")
    if args.compile and not args.static_cache:
        raise ValueError("--compile needs --static-cache: one compiled graph needs the cache's fixed shapes")
    torch.set_num_threads(args.threads)
    bench = FirstPackage(build(args, args.dtype, args.hift_dtype), args)
    if args.compile:
        bench.tts.lm.compile_decode_step(backend=args.compile_backend)
    for k in range(args.warmup):
        bench.request(1000 + k)
    runs = [bench.request(k) for k in range(args.requests)]
    stats = {s: summary([r[s] for r in runs]) for s in (*STAGES, "first_package_s")}
    steps, m = runs[0]["lm_steps"], runs[0]["package_tokens"]
    per_step = statistics.median(r["lm_steps_s"] / r["lm_steps"] for r in runs)
    totals = {"tokens": m, "lm_s": per_step * m, "flow_s": stats["flow_chunk_s"]["median"],
              "vocoder_s": stats["hift_s"]["median"]}
    eq11 = eq11_latency(totals, m)
    rate = bench.tts.config.token_rate
    device = torch.cuda.get_device_name() if bench.tts.device.type == "cuda" else f"cpu ({args.threads} threads)"
    results = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "device": device,
               "torch": torch.__version__, "prompt_tokens": runs[0]["prompt_tokens"], "package_tokens": m,
               "lm_steps": steps, "nfe": bench.tts.flow.cfg.n_timesteps, "cfg_batch": 2,
               "package_audio_s": runs[0]["speech"].shape[1] / bench.tts.sample_rate, "stages": stats, "eq11": eq11,
               "rtf": (eq11["d_lm"] + eq11["d_fm"] + eq11["d_voc"]) * rate, "parity": None}
    if args.dtype or args.hift_dtype:
        results["parity"] = parity(bench, FirstPackage(build(args, None, None), args), runs[0]["tokens"])
    print(f"first package over {args.requests} requests on {device}: {m} tokens (prompt {results['prompt_tokens']}), "
          f"LM prefill + {steps} steps, flow {results['nfe']} NFE x batch 2, HiFT")
    for name, s in stats.items():
        print(f"  {name:16s} median {s['median'] * 1000:9.1f} ms   p90 {s['p90'] * 1000:9.1f} ms")
    print(f"  eq. 11 with the medians: M={m} x (d_lm {eq11['d_lm'] * 1000:.1f} + d_fm {eq11['d_fm'] * 1000:.1f} + "
          f"d_voc {eq11['d_voc'] * 1000:.1f} ms) = {eq11['L_TTS'] * 1000:.0f} ms; steady-state RTF {results['rtf']:.3f}")
    if results["parity"]:
        print("  half precision vs float32 on the same tokens:", {k: f"{v:.2e}" for k, v in results["parity"].items()})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s in all)")
