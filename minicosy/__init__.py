"""minicosy: a compact, notebook-first, trainable and tested re-implementation of CosyVoice 2.

One file per concept of the paper (``shared/paper/cosyvoice2-paper.txt``); start with
:mod:`minicosy.config` (all hyperparameters), :mod:`minicosy.audio` (the three front-end features)
and :mod:`minicosy.data` (the project's own corpus).
"""
__version__ = "0.1.0"
