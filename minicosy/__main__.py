"""minicosy's command line.

* ``python -m minicosy demo`` -- the README's main job: the tiny model speaks a held-out sentence in
  a held-out corpus voice (streaming), writes ``out/demo.wav`` and prints the latency breakdown.
* ``python -m minicosy tts --text ... [--prompt-wav W --prompt-text T | --instruct I | --spk-id S]``
  -- synthesise with any model folder (``--model tiny`` or an official CosyVoice2-0.5B folder).
* ``python -m minicosy eval`` -- WER and speaker similarity on held-out sentences and voices.
* ``python -m minicosy pipeline`` -- draw the pipeline diagram of a preset (``docs/pipeline.png``).
* ``python -m minicosy lab [JUPYTERLAB ARGS]`` -- trust the notebooks, then open the app (notebook 10)
  in JupyterLab (``make lab``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .config import CorpusConfig, get_config



DEFAULT_SPEAKER = "hibari_heart"     # `tts` without a prompt or speaker id speaks as this SFT speaker
# `demo` speaks in this held-out voice: one whose own recordings pocketsphinx reads (`python -m
# minicosy eval --per-voice 20` prints each voice's recording WER), so its transcript means something
DEMO_VOICE = "flite_rms"
# ... with the tiny chain that speaks (issue 20: reading units as text, 729 speech codes, 20.8 h)
DEMO_MODEL = "tiny-phone"


def check_output_path(path: str | Path) -> None:
    """Before any synthesis: the output must be a writable .wav file path."""
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise ValueError(f"--out must name a .wav file, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder")
    parent = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {str(path)!r} cannot be written ({parent} is not a writable folder)")


def _write(path: str | Path, outputs: list[dict], sample_rate: int) -> np.ndarray:
    import soundfile as sf

    from .pipeline import join_speech

    wav = join_speech(outputs)[0].numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, sample_rate)
    print(f"wrote {os.path.relpath(path)}: {len(wav) / sample_rate:.2f} s at {sample_rate} Hz")
    return wav


def print_latency(outputs: list[dict], m: int = 25) -> None:
    """Per-chunk stage times, the request's totals and eq. 11 filled in with measured numbers."""
    from .pipeline import eq11_latency

    print(f"\n{'chunk':>5} {'tokens':>6} {'audio s':>8} {'LM s':>7} {'flow s':>7} {'voc s':>7} {'ready at s':>10}")
    for i, o in enumerate(outputs):
        t = o["timings"]
        print(f"{i:5d} {t['tokens']:6d} {t['audio_s']:8.2f} {t['lm_s']:7.3f} {t['flow_s']:7.3f} {t['vocoder_s']:7.3f} "
              f"{t['end_s']:10.3f}")
    tot = outputs[-1]["totals"]
    print(f"front-end {tot['frontend_s']:.3f} s | LM {tot['lm_s']:.3f} s | flow {tot['flow_s']:.3f} s | "
          f"vocoder {tot['vocoder_s']:.3f} s | {tot['tokens']} tokens, {tot['audio_s']:.2f} s audio | "
          f"RTF {tot['rtf']:.3f} | first package after {tot['first_package_s']:.3f} s")
    e = eq11_latency(tot, m)
    print(f"eq. 11: L_TTS = M·d_lm + M·d_fm + M·d_voc = {m}·{e['d_lm']:.4f} + {m}·{e['d_fm']:.4f} + "
          f"{m}·{e['d_voc']:.4f} = {e['L_TTS']:.3f} s")


def demo(root: str, out: str, seed: int) -> None:
    """Build the corpus if needed; zero-shot streaming synthesis of a held-out sentence in a held-out
    voice with the tiny phone chain (:data:`DEMO_MODEL`); the wav, the latency breakdown and what
    pocketsphinx hears from it and from the voice's own recording of the sentence."""
    import torch

    from .data import build_corpus
    from .eval import SphinxASR, error_rate, synthesis_trials
    from .pipeline import CosyVoice2

    if not (Path(root) / "manifest.jsonl").exists():
        print(f"no corpus under {root}: building it (about 2 minutes on 2 cores)")
        build_corpus(CorpusConfig(root=root))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    trials = [t for t in synthesis_trials(root, n=8) if t["target"]["speaker"] == DEMO_VOICE]
    if not trials:
        raise ValueError(f"the corpus under {root} has no held-out English sentence in the demo voice {DEMO_VOICE}")
    trial = trials[0]
    target, prompt = trial["target"], trial["prompt"]
    print(f"prompt: {prompt['speaker']} (held-out voice) saying {prompt['text']!r}")
    print(f"text:   {target['text']!r} (a held-out sentence)")
    tts = CosyVoice2.from_pretrained(DEMO_MODEL)
    print(f"model:  {DEMO_MODEL} (data/checkpoints/README.md)")
    outputs = list(tts.inference_zero_shot(target["text"], prompt["text"], str(Path(root) / prompt["path"]),
                                           stream=True, seed=seed))
    wav = _write(out, outputs, tts.sample_rate)
    print_latency(outputs, tts.config.streaming.token_hop_len)
    from .audio import load_wav

    asr = SphinxASR()
    heard = asr.transcribe(wav, tts.sample_rate)
    own = asr.transcribe(*load_wav(Path(root) / target["path"]))
    print(f"\npocketsphinx hears: {heard!r} (WER {error_rate([target['text']], [heard], 'en'):.2f}); "
          f"on the corpus recording of the same sentence: {own!r} (WER {error_rate([target['text']], [own], 'en'):.2f})")


def tts_command(args: argparse.Namespace) -> None:
    import torch

    from .pipeline import CosyVoice2

    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_path(args.out)
    tts = CosyVoice2.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    common = {"stream": args.stream, "speed": args.speed, "seed": args.seed, "incremental": args.incremental}
    if args.prompt_wav is None and args.instruct is not None:
        raise ValueError("--instruct needs --prompt-wav (the voice that follows the instruction)")
    if args.spk_id or args.prompt_wav is None:
        speakers = tts.list_available_spks()
        spk_id = args.spk_id or (DEFAULT_SPEAKER if DEFAULT_SPEAKER in speakers else next(iter(speakers), None))
        if spk_id is None:
            raise ValueError(f"{args.model} has no registered speaker: give --prompt-wav (and --prompt-text)")
        if not args.spk_id:
            print(f"no --prompt-wav or --spk-id: speaking as {spk_id!r} (the default voice)")
        gen = tts.inference_sft(args.text, spk_id, **common)
    elif args.instruct is not None:
        gen = tts.inference_instruct2(args.text, args.instruct, args.prompt_wav, **common)
    elif args.prompt_text:
        gen = tts.inference_zero_shot(args.text, args.prompt_text, args.prompt_wav, **common)
    else:
        gen = tts.inference_cross_lingual(args.text, args.prompt_wav, **common)
    outputs = list(gen)
    _write(args.out, outputs, tts.sample_rate)
    print_latency(outputs, tts.config.streaming.token_hop_len)


def eval_command(args: argparse.Namespace) -> None:
    import torch

    from .eval import (evaluate_tts, evaluate_voices, format_comparison, format_table, format_voice_table,
                       stage_outputs, stage_unit_error, stage_wer)
    from .pipeline import CosyVoice2, set_inference

    if args.compare:
        print(format_comparison(*(json.loads(Path(f).read_text()) for f in args.compare)))
        return
    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    tts = CosyVoice2.from_pretrained(args.model)
    if args.top_k is not None:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        tts.lm.cfg.top_k = args.top_k
    flow = {k: v for k, v in (("n_timesteps", args.flow_steps), ("cfg_rate", args.cfg_rate)) if v is not None}
    lm = {} if args.in_context_prompt is None else {"in_context_prompt": args.in_context_prompt == "on"}
    # the same names and checks as a model folder's "inference" section
    set_inference(Path("eval's options"), {"flow": flow, "lm": lm}, {"flow": tts.flow.cfg, "lm": tts.lm.cfg})
    modes = tuple(m.strip() for m in args.modes.split(","))
    if args.instructions:
        from .eval_instruct import corpus_instruction_changes, evaluate_instructions, instruction_table, quality_table

        result = evaluate_instructions(tts, args.corpus, n=args.n, seed=args.seed)
        print(instruction_table(result["changes"], corpus_instruction_changes(args.corpus)))
        print("\n" + quality_table(result["quality"]))
        if args.json:
            Path(args.json).write_text(json.dumps({k: result[k] for k in ("changes", "quality")}, indent=1))
        return
    if args.pitch_carriers:
        from .eval_instruct import pitch_carriers, pitch_table

        carriers = pitch_carriers(tts, args.corpus, n=args.n, seed=args.seed)
        print(pitch_table(carriers))
        if args.json:
            Path(args.json).write_text(json.dumps(carriers, indent=1))
        return
    if args.per_voice:
        result = evaluate_voices(tts, args.corpus, args.voices, args.per_voice, modes, seed=args.seed)
        result.update(top_k=tts.lm.cfg.top_k, flow_steps=tts.flow.cfg.n_timesteps, cfg_rate=tts.flow.cfg.cfg_rate,
                      in_context_prompt=tts.lm.cfg.in_context_prompt)
        print(format_voice_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    table = evaluate_tts(tts, args.corpus, n=args.n, modes=modes,
                         seed=args.seed, incremental=args.incremental, voices=args.voices)
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    if args.stages:
        outputs = list(stage_outputs(tts, args.corpus, n=args.n, seed=args.seed, voices=args.voices))
        wer, units = stage_wer(tts, outputs=outputs), stage_unit_error(tts, outputs=outputs)
        print(f"\n{'stage':34s} {'WER':>6s} {'unit error':>11s}")
        for stage in wer:
            print(f"{stage:34s} {wer[stage]:6.3f} {units[stage]:11.3f}")


ROOT = Path(__file__).resolve().parents[1]
APP_NOTEBOOK = "notebooks/10_interactive.ipynb"


def trust_notebooks(folder: Path = ROOT / "notebooks") -> list[Path]:
    """Sign the notebooks in ``folder`` in this user's Jupyter trust database (as ``jupyter trust``
    does; the files are not changed): JupyterLab strips the ``data:`` sources of the committed audio
    players from untrusted notebooks, leaving them silent. Returns the notebooks signed."""
    import nbformat
    from nbformat.sign import NotebookNotary

    notary, paths = NotebookNotary(), sorted(folder.glob("*.ipynb"))
    for path in paths:
        notary.sign(nbformat.read(path, as_version=4))
    return paths


def lab(extra: list[str]) -> None:
    """Trust the notebooks, then replace this process by JupyterLab on the app's notebook (extra
    arguments go to JupyterLab, e.g. ``--no-browser --port 8890``)."""
    print(f"trusted {len(trust_notebooks())} notebooks; opening {APP_NOTEBOOK} in JupyterLab", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={ROOT}",
                              str(ROOT / APP_NOTEBOOK), *extra])


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(prog="python -m minicosy", description="minicosy: CosyVoice 2, small and readable")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: the tiny model speaks in a held-out voice, with latencies")
    d.add_argument("--root", default=CorpusConfig.root)
    d.add_argument("--out", default="out/demo.wav")
    d.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("tts", help="synthesise text to a wav file")
    t.add_argument("--text", required=True)
    t.add_argument("--prompt-wav")
    t.add_argument("--prompt-text", help="transcript of --prompt-wav (zero-shot); without it: cross-lingual")
    t.add_argument("--instruct", help="an instruction, e.g. 'Please speak very fast.' (instruct2 mode)")
    t.add_argument("--spk-id", help=f"a speaker id known to the model (SFT mode); without it and without --prompt-wav "
                   f"the model speaks as {DEFAULT_SPEAKER!r} (or its first registered speaker)")
    t.add_argument("--stream", action="store_true")
    t.add_argument("--incremental", action="store_true", help="streaming flow that caches past chunks")
    t.add_argument("--speed", type=float, default=1.0)
    t.add_argument("--model", default="tiny-phone", help="'tiny-phone' (speaks English), 'tiny-phone-instruct', 'tiny' (BPE, the paper's text units) or a model folder (official CosyVoice2-0.5B or minicosy)")
    t.add_argument("--device", default=None, help="cpu (default), cuda or mps")
    t.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="LM and flow precision")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--out", default="out/tts.wav")
    e = sub.add_parser("eval", help="WER and speaker similarity on held-out sentences and voices")
    e.add_argument("--model", default="tiny-phone", help="'tiny-phone', 'tiny-phone-instruct', 'tiny' or a model folder")
    e.add_argument("--corpus", default=CorpusConfig.root)
    e.add_argument("--n", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--modes", default="offline,FM stream,LM stream,LM+FM stream",
                   help="comma-separated: offline, FM stream, LM stream, LM+FM stream (Table 8's grid); with "
                        "--per-voice also GL true mel, HiFT true mel, flow true tokens (the stage table) and "
                        "no LM prompt (the LM without the prompt, as cross-lingual; 'no LM prompt LM+FM stream' "
                        "with text-in and flow streaming)")
    e.add_argument("--incremental", action="store_true")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--json", help="also write the table as JSON")
    e.add_argument("--voices", choices=["heldout", "seen"], default="heldout",
                   help="held-out voices (zero-shot), or the training voices on their dev/test sentences")
    e.add_argument("--per-voice", type=int, default=0, metavar="N",
                   help="instead: per voice, N sentences' synthesis WER next to the voice's own recordings of them "
                        "(the eval split of the large corpus where there is one), pooled over the voices the judge reads")
    e.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="instead: two --per-voice --json results on the same sentences, B - A per mode with a "
                        "paired bootstrap 95%% interval (pooled over the readable voices)")
    e.add_argument("--top-k", type=int, metavar="K",
                   help="the LM's RAS top-k for this evaluation (default: the checkpoint's; the paper's is 25, §2.3)")
    e.add_argument("--flow-steps", type=int, metavar="N",
                   help="the flow's ODE steps for this evaluation (default: the checkpoint's; the paper's is 10, §2.4)")
    e.add_argument("--cfg-rate", type=float, metavar="B",
                   help="the flow's classifier-free guidance strength beta (eq. 10) for this evaluation "
                        "(default: the checkpoint's; the paper's is 0.7)")
    e.add_argument("--in-context-prompt", choices=("on", "off"),
                   help="whether zero-shot synthesis puts the prompt in the LM's context for this evaluation "
                        "(default: the model folder's; the paper's is on, §2.3)")
    e.add_argument("--instructions", action="store_true",
                   help="instead: instruction following (§2.6, Table 10 analogue) over --n held-out trials, each "
                        "condition's right-way share with its Wilson 95%% interval next to the engines' own renderings")
    e.add_argument("--pitch-carriers", action="store_true",
                   help="instead: where pitch lives (§2.2, §2.4), on --n pitch renderings per condition of the instruct "
                        "sub-corpus: the F0 shift of the recordings, of the flow on their speech tokens, and of the flow "
                        "prompted by a rendering in the condition")
    e.add_argument("--stages", action="store_true",
                   help="also print where the words are lost: WER and the speech tokenizer's unit error after each stage")
    sub.add_parser("lab", help="trust the notebooks and open the app (notebook 10) in JupyterLab; "
                               "other arguments go to JupyterLab")
    p = sub.add_parser("pipeline", help="draw the pipeline diagram of a config preset to a PNG")
    p.add_argument("--preset", default="cosyvoice2_0p5b")
    p.add_argument("--out", default="docs/pipeline.png")
    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "lab":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.cmd == "demo":
            demo(args.root, args.out, args.seed)
        elif args.cmd == "tts":
            tts_command(args)
        elif args.cmd == "eval":
            eval_command(args)
        elif args.cmd == "lab":
            lab(extra)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:   # one line, not a traceback
        print(f"minicosy {args.cmd}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.cmd == "pipeline":
        from .viz import plot_pipeline

        fig = plot_pipeline(get_config(args.preset))
        fig.savefig(args.out, dpi=72)
        print(f"\nfigure: {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
