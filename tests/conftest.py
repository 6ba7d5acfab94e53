"""Shared paths and skips: reference material lives in ../shared, the corpus in data/corpus."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "reference" / "golden"
MANIFESTS = SHARED / "reference" / "manifests"
SHARED_DATA = SHARED / "data"
CORPUS = ROOT / "data" / "corpus"


def load_benchmark(name: str):
    """A script of ``benchmarks/`` (not a package) as a module, e.g. to call its ``main(argv)``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need(path: Path, what: str) -> Path:
    """Skip (with the reason) where optional reference material is absent, e.g. a user's clone."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (it ships beside the repo as ../shared)")
    return path


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a test module: thousands of tiny kernels only pay for OpenMP's
    spin-waits on a busy 2-core machine. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def frontend_fixtures() -> dict:
    return torch.load(need(GOLDEN / "frontend_fixtures.pt", "golden front-end fixtures"), weights_only=True)


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    if not (CORPUS / "manifest.jsonl").exists():
        pytest.skip("corpus not built: run `python -m minicosy.data build` (make test does)")
    return CORPUS


def torchaudio_or_skip():
    """torchaudio for reference checks (the official front end's resampler and Kaldi fbank), or a
    skip. The torchaudio wheel on PyPI is built for CUDA torch and fails to load its compiled
    extension beside the CPU torch; the parts compared against here are pure Python, so it is then
    imported with that extension stubbed out (as the golden fbank fixture was made, see its README)."""
    import importlib
    import sys
    import types

    if importlib.util.find_spec("torchaudio") is None:
        pytest.skip("torchaudio is not installed; its PyPI wheel (a CUDA build) breaks `import transformers` beside "
                    "the CPU torch, so keep it out of the venv: pip install --no-deps --target DIR torchaudio==2.11.1 "
                    "and run this file with PYTHONPATH=DIR")
    try:
        import torchaudio
    except OSError:
        stub = types.ModuleType("torchaudio._extension")
        stub._IS_TORCHAUDIO_EXT_AVAILABLE = stub._IS_ALIGN_AVAILABLE = False
        stub.fail_if_no_align = lambda fn: fn
        sys.modules["torchaudio._extension"] = stub
        import torchaudio
    return torchaudio
