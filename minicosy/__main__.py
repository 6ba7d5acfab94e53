"""minicosy's command line.

* ``python -m minicosy demo`` -- the README's main job. For now: build the corpus when it is
  missing, print its statistics and write a figure of them; later components turn it into speech
  synthesis.
* ``python -m minicosy pipeline`` -- draw the pipeline diagram of a preset (``docs/pipeline.png``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import CorpusConfig, get_config
from .data import build_corpus, corpus_stats, load_manifest, print_stats


def _save(fig, path: str | Path, dpi: int) -> None:
    fig.savefig(path, dpi=dpi)
    print(f"\nfigure: {os.path.relpath(path)}")


def demo(root: str) -> None:
    """Build the corpus if needed, print and plot its statistics."""
    from .viz import plot_corpus_stats

    if not (Path(root) / "manifest.jsonl").exists():
        print(f"no corpus under {root}: building it (about 2 minutes on 2 cores)")
        build_corpus(CorpusConfig(root=root))
    records = load_manifest(root)
    print_stats(corpus_stats(records))
    _save(plot_corpus_stats(records), Path(root) / "stats.png", dpi=100)


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(prog="python -m minicosy", description="minicosy: CosyVoice 2, small and readable")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: corpus (built if missing) and its statistics")
    d.add_argument("--root", default=CorpusConfig.root)
    p = sub.add_parser("pipeline", help="draw the pipeline diagram of a config preset to a PNG")
    p.add_argument("--preset", default="cosyvoice2_0p5b")
    p.add_argument("--out", default="docs/pipeline.png")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        demo(args.root)
    else:
        from .viz import plot_pipeline

        _save(plot_pipeline(get_config(args.preset)), args.out, dpi=72)


if __name__ == "__main__":
    main()
