"""minicosy's command line: ``python -m minicosy demo`` (the README's main job).

For now the main job builds the corpus when it is missing, prints its statistics and writes a
figure of them; later components turn it into speech synthesis.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import CorpusConfig
from .data import print_stats, build_corpus, corpus_stats, load_manifest


def demo(root: str) -> None:
    """Build the corpus if needed, print and plot its statistics."""
    if not (Path(root) / "manifest.jsonl").exists():
        print(f"no corpus under {root}: building it (about 2 minutes on 2 cores)")
        build_corpus(CorpusConfig(root=root))
    records = load_manifest(root)
    print_stats(corpus_stats(records))
    import matplotlib

    matplotlib.use("Agg")
    from .viz import plot_corpus_stats

    png = Path(root) / "stats.png"
    plot_corpus_stats(records).savefig(png, dpi=100)
    print(f"\nfigure: {os.path.relpath(png)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minicosy", description="minicosy: CosyVoice 2, small and readable")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: corpus (built if missing) and its statistics")
    d.add_argument("--root", default=CorpusConfig.root)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        demo(args.root)


if __name__ == "__main__":
    main()
