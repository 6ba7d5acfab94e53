#!/usr/bin/env bash
# One-time set-up used by `make demo` and `make test`: Debian packages, a virtual environment that
# keeps an already-installed torch, torch itself if missing, then the project with all extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# TTS engines of the corpus, plus what building webrtcvad (resemblyzer) and a venv need; Chromium and
# its driver for the browser test of the notebooks and the app (tests/test_browser.py, skipped without).
APT_PACKAGES="flite espeak-ng libsndfile1 chromium chromium-driver"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "minicosy needs Python >= 3.10 (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }

missing=""
if command -v dpkg >/dev/null; then
  for p in $APT_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  command -v gcc >/dev/null || missing="$missing gcc"
  "$PYTHON" -c 'import ensurepip' 2>/dev/null || missing="$missing python3-venv"
  "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing="$missing python3-dev"
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
  else
    echo "Debian packages missing:$missing -- install them with:"
    echo "  sudo apt-get install -y$missing"
    echo "(the corpus skips TTS engines that are not installed; tests/test_browser.py skips without Chromium)"
  fi
fi

# The Debian engines render the corpus: other versions render other audio (corpus.json records them).
TESTED_DEB="flite=2.2-5 espeak-ng=1.51+dfsg-10+deb12u2"
if command -v dpkg-query >/dev/null; then
  for pv in $TESTED_DEB; do
    have=$(dpkg-query -W -f='${Version}' "${pv%%=*}" 2>/dev/null || true)
    [ -z "$have" ] || [ "$have" = "${pv#*=}" ] || echo "note: ${pv%%=*} $have is installed; the corpus was tested with ${pv#*=}" \
      "(a different version renders different audio, so the notebooks' measured numbers may move)" >&2
  done
fi

# --system-site-packages: a torch already installed for this Python is kept, not replaced.
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c 'import torch' 2>/dev/null; then
  # On the project's machines this takes the local CPU build; an unpinned torch would pull CUDA.
  "$PY" -m pip install -q torch==2.13.0
fi
# constraints.txt pins the tested versions (the corpus audio and the evaluation depend on them)
"$PY" -m pip install -q -c constraints.txt -e ".[dev,data,eval]"
# test-only: s3tokenizer, an independent speech_tokenizer_v2 (tests/test_official_tokenizer.py), without its
# dependencies: its torchaudio is a CUDA build that cannot load beside the CPU torch and breaks `import transformers`
"$PY" -m pip install -q -c constraints.txt --no-deps s3tokenizer einops
# notebooks run on this environment's Python (not a system-wide "python3" kernel); the display name is
# the one the committed notebooks carry, so that opening one does not mark it modified
"$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
# JupyterLab strips the data: sources of untrusted notebooks' audio players: trust the committed ones
# (this user's trust database; the files are unchanged). `make lab` trusts them again after a pull.
"$VENV/bin/jupyter" trust notebooks/*.ipynb >/dev/null
echo "set-up done: $("$PY" -c 'import torch, minicosy; print("torch", torch.__version__)')"
