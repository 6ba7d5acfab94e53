"""CAM++ speaker embedding: the 192-d speaker vector v of CosyVoice 2 (Fig. 1; NOTES.md §6).

The official system runs 3D-Speaker's CAM++ as ``campplus.onnx`` on a mean-normalised 80-bin Kaldi
fbank at 16 kHz (input ``input`` (1, T, 80) float32 → output ``output`` (1, 192); CosyVoice's frontend
feeds the session's first input, C++ runtimes calling the same file name them). This file holds

* :class:`CAMPPlus`   -- the network, with the official module names (so 3D-Speaker state dicts load
  strictly): FCM 2-D conv front-end → TDNN (stride 2) → 3 D-TDNN blocks of CAM dense layers, each
  followed by a transit layer → BN-ReLU → mean+std statistics pooling → dense layer to 192-d;
* :class:`CAMPPlusONNX` -- an onnxruntime session behind the same :meth:`embed` API;
* :func:`export_onnx` / :func:`load_from_onnx` -- write the module as the official file's layout, and
  read any such file's initializers back into the module (conv-BN folding undone, see there);
* strict loading with a readable key/shape report (:func:`minicosy.train.load_state_dict_checked`);
* :func:`train_campplus` -- the small-scale recipe: additive-angular-margin softmax over the corpus'
  training voices on random 2-3 s fbank crops (``python -m minicosy.train campplus``).

Shapes: fbank (B, T, 80) → FCM (B, C·10, T) → TDNN (B, init, ⌈T/2⌉) → blocks → stats (B, 2C) → (B, 192).

Usage::

    net = CAMPPlus(get_config("tiny").campplus)
    v = net.embed(wav, sr)                        # (1, 192), as the official frontend returns it
    export_onnx(net, "campplus.onnx")
    same = load_from_onnx("campplus.onnx", net.cfg)
    trained = CAMPPlus.from_checkpoint("data/checkpoints/campplus_tiny.pt")
"""
from __future__ import annotations

import argparse

import math
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from .audio import kaldi_fbank, load_wav, resample
from .config import CAMPPlusConfig, FeatureConfig, get_config
from .data import load_manifest
from .train import (TrainConfig, check_finite, load_state_dict_checked, model_from_checkpoint, onnx_session,
                    read_torch_file, recipe_parser, save_checkpoint, seed_everything, train_loop)

MIN_FRAMES = 3          # fbank frames: the stride-2 TDNN must leave >= 2 frames for the std of stats pooling
ONNX_INPUT, ONNX_OUTPUT = "input", "output"   # the names inside the official campplus.onnx


def bn_relu(channels: int) -> nn.Sequential:
    """The official ``batchnorm-relu`` nonlinearity (keys ``<name>.batchnorm.*``)."""
    return nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(channels), relu=nn.ReLU()))


class BasicResBlock(nn.Module):
    """2-D residual block of the FCM; ``stride`` down-samples frequency only."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class FCM(nn.Module):
    """Front-end convolution module: 2-D convs over (freq, time) that shrink frequency 8x, then
    flatten channels x frequency into the 1-D channel axis: (B, T, F) → (B, C·F/8, T)."""

    def __init__(self, channels: int, blocks: tuple[int, ...], n_mels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(*[BasicResBlock(channels, channels, 2 if i == 0 else 1) for i in range(blocks[0])])
        self.layer2 = nn.Sequential(*[BasicResBlock(channels, channels, 2 if i == 0 else 1) for i in range(blocks[1])])
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (n_mels // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x.transpose(1, 2).unsqueeze(1))))
        x = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(x)))))
        return x.flatten(1, 2)


class TDNNLayer(nn.Module):
    """Conv1d (k 5, stride 2, same padding, no bias) → BN → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                                padding=kernel_size // 2, bias=False)
        self.nonlinear = bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Context-aware masking: a local dilated conv, gated by a sigmoid mask computed from the
    utterance mean plus the mean of the surrounding ``seg_len``-frame segment."""

    def __init__(self, channels: int, out_channels: int, kernel_size: int, dilation: int, seg_len: int,
                 reduction: int = 2):
        super().__init__()
        self.seg_len = seg_len
        self.linear_local = nn.Conv1d(channels, out_channels, kernel_size, dilation=dilation,
                                      padding=(kernel_size - 1) // 2 * dilation, bias=False)
        self.linear1 = nn.Conv1d(channels, channels // reduction, 1)
        self.linear2 = nn.Conv1d(channels // reduction, out_channels, 1)

    def segment_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Each frame gets the mean of its segment (the last, shorter one averages what it has)."""
        seg = F.avg_pool1d(x, self.seg_len, self.seg_len, ceil_mode=True)         # (B, C, ⌈T/seg⌉)
        return seg.unsqueeze(-1).expand(*seg.shape, self.seg_len).flatten(2)[..., :x.shape[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(-1, keepdim=True) + self.segment_mean(x)
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return self.linear_local(x) * mask


class CAMDenseTDNNLayer(nn.Module):
    """BN-ReLU → 1x1 bottleneck → BN-ReLU → CAM layer: ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, growth_rate: int, bn_channels: int, kernel_size: int, dilation: int,
                 seg_len: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CAM++ kernel sizes must be odd for same padding, got {kernel_size}")
        self.nonlinear1 = bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = bn_relu(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, growth_rate, kernel_size, dilation, seg_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleList):
    """D-TDNN block: densely connected, every layer sees the concatenation of all before it."""

    def __init__(self, n_layers: int, in_channels: int, growth_rate: int, bn_channels: int, kernel_size: int,
                 dilation: int, seg_len: int):
        super().__init__()
        for i in range(n_layers):
            self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(in_channels + i * growth_rate, growth_rate,
                                                               bn_channels, kernel_size, dilation, seg_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    """BN-ReLU → 1x1 conv (no bias) that halves the channels between blocks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    """Mean and unbiased standard deviation over time, concatenated: (B, C, T) → (B, 2C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(-1), x.std(-1)], dim=-1)


class DenseLayer(nn.Module):
    """1x1 conv to the embedding, then a BatchNorm without affine parameters."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(out_channels, affine=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """CAM++ (3D-Speaker): mean-normalised fbank (B, T, n_mels) → speaker embedding (B, embedding_size).

    Conv1d weights get Kaiming-normal initialisation (as in 3D-Speaker), all random draws come from
    ``generator`` (the global RNG when None).
    """

    def __init__(self, cfg: CAMPPlusConfig | None = None, generator: torch.Generator | None = None):
        super().__init__()
        cfg = cfg or CAMPPlusConfig()
        if not len(cfg.block_layers) == len(cfg.kernel_sizes) == len(cfg.dilations):
            raise ValueError("CAMPPlusConfig.block_layers, kernel_sizes and dilations need one entry per block, got "
                             f"{cfg.block_layers}, {cfg.kernel_sizes}, {cfg.dilations}")
        if cfg.n_mels % 8:
            raise ValueError(f"n_mels must be a multiple of 8 (the FCM halves it three times), got {cfg.n_mels}")
        self.cfg = cfg
        self.head = FCM(cfg.fcm_channels, cfg.fcm_blocks, cfg.n_mels)
        layers: OrderedDict[str, nn.Module] = OrderedDict(tdnn=TDNNLayer(self.head.out_channels, cfg.init_channels))
        channels = cfg.init_channels
        for i, (n, k, d) in enumerate(zip(cfg.block_layers, cfg.kernel_sizes, cfg.dilations), start=1):
            layers[f"block{i}"] = CAMDenseTDNNBlock(n, channels, cfg.growth_rate, cfg.bn_size * cfg.growth_rate,
                                                    k, d, cfg.seg_len)
            channels += n * cfg.growth_rate
            layers[f"transit{i}"] = TransitLayer(channels, channels // 2)
            channels //= 2
        layers["out_nonlinear"] = bn_relu(channels)
        layers["stats"] = StatsPool()
        layers["dense"] = DenseLayer(2 * channels, cfg.embedding_size)
        self.xvector = nn.Sequential(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):   # torch's default Conv2d init, drawn from ``generator`` too
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            check_features(feats, self.cfg.n_mels)
        return self.xvector(self.head(feats))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "CAMPPlus":
        """The model saved by :func:`train_campplus` (eval mode)."""
        return model_from_checkpoint(path, lambda mc: cls(CAMPPlusConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                                         for k, v in mc.items()})))

    @torch.no_grad()
    def embed(self, wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """Speaker embedding (1, embedding_size) of one waveform at any rate, in eval mode
        (the official ``_extract_spk_embedding``, NOTES.md §6). The train/eval mode is restored."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            return self(speaker_features(wav, sr).to(device)).cpu()
        finally:
            self.train(was_training)


def check_features(feats: torch.Tensor | np.ndarray, n_mels: int) -> None:
    """ValueError unless ``feats`` is (batch, frames >= MIN_FRAMES, n_mels)."""
    if feats.ndim != 3 or feats.shape[-1] != n_mels:
        raise ValueError(f"CAM++ expects fbank features (batch, frames, {n_mels}), got {tuple(feats.shape)}")
    if feats.shape[1] < MIN_FRAMES:
        raise ValueError(f"CAM++ needs at least {MIN_FRAMES} fbank frames, got {feats.shape[1]}")


def speaker_features(wav: np.ndarray | torch.Tensor, sr: int, cfg: FeatureConfig = FeatureConfig()) -> torch.Tensor:
    """The CAM++ input (1, T, 80): resample to 16 kHz, Kaldi fbank, minus its mean over time (NOTES.md §6).

    ``wav`` is one float waveform in [-1, 1], shape (samples,) or (1, samples). Raises ``ValueError``
    for several channels, a non-positive rate, silence (peak < 1e-5) or fewer than ``MIN_FRAMES`` frames.
    """
    x = torch.as_tensor(wav, dtype=torch.float32).detach().cpu().numpy()
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"expected one mono waveform (samples,) or (1, samples), got shape {x.shape}")
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    x = resample(x, sr, cfg.speaker_sample_rate)
    win = int(cfg.speaker_sample_rate * cfg.fbank_frame_length_ms / 1000)
    shift = int(cfg.speaker_sample_rate * cfg.fbank_frame_shift_ms / 1000)
    need = win + (MIN_FRAMES - 1) * shift
    if x.size < need:
        raise ValueError(f"audio too short for a speaker embedding: {x.size} samples at {cfg.speaker_sample_rate} Hz, "
                         f"need at least {need} ({1000 * need / cfg.speaker_sample_rate:.0f} ms)")
    if float(np.abs(x).max()) < 1e-5:
        raise ValueError("audio is silent (peak below 1e-5): no speaker to embed")
    return kaldi_fbank(x, cfg).unsqueeze(0)


class CAMPPlusONNX:
    """The official ``campplus.onnx`` (or :func:`export_onnx`'s file) behind the :class:`CAMPPlus` API.

    Like the official frontend it feeds the session's first input, float32 (1, T, 80).
    """

    def __init__(self, path: str | Path, n_mels: int = 80, num_threads: int = 1):
        self.path = Path(path)
        self.session = onnx_session(path, "CAM++ ONNX model", num_threads)
        self.input_name = self.session.get_inputs()[0].name
        self.n_mels = n_mels

    def __call__(self, feats: torch.Tensor | np.ndarray) -> torch.Tensor:
        """fbank (B, T, n_mels) → embeddings (B, 192)."""
        check_features(feats, self.n_mels)
        x = torch.as_tensor(feats, dtype=torch.float32).detach().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    def embed(self, wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """Speaker embedding (1, 192) of one waveform at any rate."""
        return self(speaker_features(wav, sr))


def export_onnx(model: CAMPPlus, path: str | Path, fold_batchnorm: bool = True, frames: int = 200,
                opset: int = 17) -> Path:
    """Write ``model`` (in eval mode) as ONNX with the official names: ``input`` (B, T, n_mels) float32
    with dynamic batch and time → ``output`` (B, embedding_size).

    Uses torch's TorchScript-based exporter (``dynamo=False``; no onnxscript needed). With
    ``fold_batchnorm`` (constant folding) it folds each BatchNorm that directly follows a conv into that
    conv's weight and bias, and the others stay ``BatchNormalization`` nodes; without it every
    initializer keeps its state-dict name. :func:`load_from_onnx` reads both."""
    path = Path(path)
    was_training = model.training
    model.eval()
    dummy = torch.zeros(1, frames, model.cfg.n_mels, device=next(model.parameters()).device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the legacy exporter's deprecation notice
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=fold_batchnorm,
                              input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              dynamic_axes={ONNX_INPUT: {0: "batch", 1: "frames"}, ONNX_OUTPUT: {0: "batch"}})
    finally:
        model.train(was_training)
    return path


def _onnx_tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant value of the graph by name: initializers, ``Constant`` nodes, and ``Identity``
    nodes that re-export them (the exporter de-duplicates equal tensors that way)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _run_order(model: CAMPPlus) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, bn_after_conv) for every conv and BatchNorm, in the order ``forward`` runs them;
    ``bn_after_conv`` marks a BatchNorm fed directly by the conv run just before it (foldable)."""
    runs: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    kinds = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: runs.append((name, mod, inp[0], out)))
             for name, m in model.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 2 * MIN_FRAMES, model.cfg.n_mels))
    finally:
        for h in hooks:
            h.remove()
    return [(name, mod, i > 0 and isinstance(mod, nn.modules.batchnorm._BatchNorm) and inp is runs[i - 1][3])
            for i, (name, mod, inp, _) in enumerate(runs)]


def load_from_onnx(path: str | Path, cfg: CAMPPlusConfig | None = None) -> CAMPPlus:
    """A :class:`CAMPPlus` (eval mode) holding the weights of a CAM++ ONNX file (official or exported).

    Mapping: the module's convs and BatchNorms, in the order ``forward`` runs them, are paired with the
    graph's ``Conv`` and ``BatchNormalization`` nodes in graph order (the first unused node with the
    right weight shape), so anonymous initializers (``onnx::Conv_123``) map as well as named ones
    (``xvector.block1.tdnnd1.nonlinear1.batchnorm.weight``, which are checked against the pairing):

    * ``Conv`` inputs (X, W, B) → ``<conv>.weight`` (and ``<conv>.bias`` where the module has one);
    * ``BatchNormalization`` inputs (X, scale, B, mean, var) → ``<bn>.weight``, ``.bias`` (affine BNs),
      ``.running_mean``, ``.running_var``;
    * a BatchNorm the exporter folded into the conv before it (Conv+BN → Conv with bias W·s, (b−μ)·s+β):
      the conv takes the folded weight and the BatchNorm becomes the identity plus the folded bias
      (weight 1, bias 0, running_mean −B, running_var 1−eps), which computes the same function.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` when the graph does not fit ``cfg``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CAM++ ONNX model {path} does not exist")
    model = CAMPPlus(cfg)
    graph = onnx.load(str(path)).graph
    values = _onnx_tensors(graph)
    feeds_bn = {x for n in graph.node if n.op_type == "BatchNormalization" for x in n.input[:1]}
    todo = {"Conv": [n for n in graph.node if n.op_type == "Conv"],
            "BatchNormalization": [n for n in graph.node if n.op_type == "BatchNormalization"]}
    own = model.state_dict()

    def take(op: str, name: str, key: str, shape: torch.Size, attrs: dict[str, list[int]] | None = None
             ) -> tuple[onnx.NodeProto, list[np.ndarray | None]]:
        """The first unused ``op`` node whose second input (weight / scale) has ``shape`` (and whose
        attributes include ``attrs``), with its inputs."""
        for node in todo[op]:
            got = {a.name: list(a.ints) for a in node.attribute}
            if (node.input[1] in values and values[node.input[1]].shape == tuple(shape)
                    and all(got.get(k, v) == v for k, v in (attrs or {}).items())):
                todo[op].remove(node)
                if node.input[1] in own and node.input[1] != key:
                    raise ValueError(f"ONNX {op} with weights {node.input[1]} would land on {name}: the file does "
                                     "not fit this CAMPPlusConfig (or its graph order differs from the module's)")
                return node, [values.get(x) if x else None for x in node.input[1:]]
        raise ValueError(f"no ONNX {op} node left for {name} ({key} of shape {tuple(shape)}): the file does not "
                         "fit this CAMPPlusConfig")

    state: dict[str, torch.Tensor] = {}
    folded: dict[str, np.ndarray] = {}
    order = _run_order(model)
    for i, (name, mod, _) in enumerate(order):
        if isinstance(mod, nn.modules.conv._ConvNd):
            node, (weight, *rest) = take("Conv", name, f"{name}.weight", mod.weight.shape,
                                         {"strides": list(mod.stride), "dilations": list(mod.dilation),
                                          "pads": list(mod.padding) * 2})
            bias = rest[0] if rest else None
            state[f"{name}.weight"] = _f32(weight)
            bias = np.zeros(mod.out_channels, np.float32) if bias is None else bias
            next_bn_folded = (i + 1 < len(order) and order[i + 1][2] and node.output[0] not in feeds_bn)
            if next_bn_folded:
                folded[order[i + 1][0]] = bias
            elif mod.bias is None and np.any(bias):
                raise ValueError(f"ONNX Conv for {name} has a bias but the module has none and no BatchNorm follows")
            if mod.bias is not None:
                state[f"{name}.bias"] = _f32(np.zeros_like(bias) if next_bn_folded else bias)
        else:
            n = mod.num_features
            if name in folded:
                scale, shift = np.ones(n, np.float32), np.zeros(n, np.float32)
                mean, var = -folded[name], np.full(n, 1.0 - mod.eps, np.float32)
            else:
                node, (scale, shift, mean, var) = take("BatchNormalization", name, f"{name}.weight",
                                                       mod.running_mean.shape)
                if any(v is None for v in (scale, shift, mean, var)):
                    raise ValueError(f"ONNX BatchNormalization for {name} has non-constant parameters")
                eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
                if not np.isclose(eps, mod.eps, rtol=1e-3):
                    raise ValueError(f"ONNX BatchNormalization for {name} has epsilon {eps}, the module {mod.eps}")
                if not mod.affine and not (np.allclose(scale, 1) and np.allclose(shift, 0)):
                    raise ValueError(f"ONNX BatchNormalization for {name} is affine but the module is not")
            if mod.affine:
                state[f"{name}.weight"], state[f"{name}.bias"] = _f32(scale), _f32(shift)
            state[f"{name}.running_mean"], state[f"{name}.running_var"] = _f32(mean), _f32(var)
            state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    left = [f"{n.op_type} {n.name or n.output[0]}" for nodes in todo.values() for n in nodes]
    if left:
        raise ValueError(f"the file does not fit this CAMPPlusConfig: no module takes the ONNX nodes {left[:10]}")
    load_state_dict_checked(model, state)
    return model.eval()


# ---- small-scale training -----------------------------------------------------------------------
class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace, as 3D-Speaker trains CAM++): cross-entropy over
    s·cos(θ_y + m) for the true speaker y and s·cos θ_j for the others, θ the angle between the
    embedding and a learned per-speaker direction. The margin pulls each voice into a tight cone."""

    def __init__(self, dim: int, n_speakers: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_speakers, dim) * 0.01)
        self.margin, self.scale = margin, scale

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
        margin = self.margin if margin is None else margin
        cos = F.linear(F.normalize(emb), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = torch.cos(torch.acos(cos) + margin)
        logits = torch.where(F.one_hot(labels, cos.shape[1]).bool(), target, cos)
        return F.cross_entropy(self.scale * logits, labels)


def corpus_fbanks(corpus_root: str | Path, split: str) -> list[dict]:
    """Manifest records of a split with their 16 kHz log fbank (T, 80) before mean normalisation,
    float16, cached as ``<corpus>/cache/fbank_<split>.pt``."""
    records = load_manifest(corpus_root, split)
    cache = Path(corpus_root) / "cache" / f"fbank_{split}.pt"
    feats = torch.load(cache, weights_only=True) if cache.exists() else {}
    if set(feats) != {r["id"] for r in records}:
        sr = FeatureConfig().speaker_sample_rate
        feats = {r["id"]: kaldi_fbank(load_wav(Path(corpus_root) / r["path"], sr)[0], mean_norm=False).half()
                 for r in records}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, cache)
    return [{**r, "fbank": feats[r["id"]]} for r in records]


def random_crops(records: list[dict], speakers: list[str], batch_size: int, frames: tuple[int, int],
                 rng: np.random.Generator):
    """Endless speaker-balanced batches (fbank (B, T, 80) mean-normalised per crop, labels (B,)):
    one crop length T in ``frames`` per batch; short utterances are tiled to T."""
    by_speaker = [[r["fbank"] for r in records if r["speaker"] == s] for s in speakers]
    while True:
        n = int(rng.integers(frames[0], frames[1] + 1))
        labels = rng.integers(len(speakers), size=batch_size)
        crops = []
        for label in labels:
            utts = by_speaker[label]
            x = utts[rng.integers(len(utts))].float()
            if len(x) < n:
                x = x.repeat(n // len(x) + 1, 1)
            start = int(rng.integers(len(x) - n + 1))
            crop = x[start:start + n]
            crops.append(crop - crop.mean(0))
        yield torch.stack(crops), torch.from_numpy(labels)


@torch.no_grad()
def embed_records(model: CAMPPlus, records: list[dict]) -> torch.Tensor:
    """Embeddings (N, D) of whole utterances, fbank mean-normalised per utterance (as :meth:`embed`)."""
    model.eval()
    return torch.cat([model((r["fbank"].float() - r["fbank"].float().mean(0))[None]) for r in records])


def train_campplus(corpus_root: str | Path = "data/corpus", preset: str = "tiny", minutes: float = 8.0,
                   out: str | Path | None = None, margin: float = 0.2, scale: float = 30.0, batch_size: int = 32,
                   seed: int = 0, threads: int = 2) -> tuple[CAMPPlus, dict]:
    """Train CAM++ with AAM softmax over the voices of the corpus' train split; report speaker
    accuracy (nearest class centre, cosine) on the dev + test utterances of those voices; save."""
    seed_everything(seed)
    torch.set_num_threads(threads)
    train = corpus_fbanks(corpus_root, "train")
    speakers = sorted({r["speaker"] for r in train})
    held = [r for split in ("dev", "test") for r in corpus_fbanks(corpus_root, split) if r["speaker"] in speakers]
    model = CAMPPlus(get_config(preset).campplus)
    head = AAMSoftmax(model.cfg.embedding_size, len(speakers), margin, scale)
    both = nn.ModuleDict({"campplus": model, "aam": head})
    tcfg = TrainConfig(lr=2e-3, weight_decay=1e-4, max_minutes=minutes, seed=seed, warmup_steps=100,
                       threads=threads)
    batches = random_crops(train, speakers, batch_size, (200, 300), np.random.default_rng(seed))
    start = time.time()

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # margin warm-up over the first fifth of the budget: plain softmax first, then the full margin
        ramp = min(1.0, (time.time() - start) / (12 * minutes))
        return head(model(batch[0]), batch[1], margin * ramp)

    log = train_loop(both, batches, loss, tcfg, desc="CAM++ (AAM softmax)")
    centres = F.normalize(head.weight.detach(), dim=1)
    emb = F.normalize(embed_records(model, held), dim=1)
    labels = torch.tensor([speakers.index(r["speaker"]) for r in held])
    metrics = {"heldout_utterance_speaker_accuracy": round(float(((emb @ centres.T).argmax(1) == labels).float().mean()), 4),
               "speakers": speakers, "train_seconds": round(time.time() - start, 1)}
    print(f"dev+test speaker accuracy {metrics['heldout_utterance_speaker_accuracy']:.3f} over {len(held)} "
          f"utterances of {len(speakers)} voices; {metrics['train_seconds']:.0f} s")
    if out is not None:
        save_checkpoint(out, model, asdict(model.cfg), tcfg, log, metrics=metrics,
                        aam={"margin": margin, "scale": scale, "crop_frames": [200, 300], "batch_size": batch_size})
    return model, metrics


def train_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train campplus [--minutes 8] [--out PATH]``."""
    p = recipe_parser("campplus", 8.0, "data/checkpoints/campplus_tiny.pt", resumable=False)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--scale", type=float, default=30.0)
    a = p.parse_args(argv)
    train_campplus(a.corpus, minutes=a.minutes, out=a.out, margin=a.margin, scale=a.scale, seed=a.seed,
                   threads=a.threads)


@torch.no_grad()
def speaker_table(model: CAMPPlus, corpus_root: str | Path = "data/corpus", split: str = "train",
                  per_voice: int = 20) -> dict[str, dict[str, torch.Tensor]]:
    """``spk2info`` for SFT synthesis (§2.7): each voice of ``split`` -> {"embedding": (1, D)}, the
    mean of the length-normalised embeddings of its first ``per_voice`` utterances."""
    records = corpus_fbanks(corpus_root, split)
    table: dict[str, dict[str, torch.Tensor]] = {}
    for voice in sorted({r["speaker"] for r in records}):
        own = [r for r in records if r["speaker"] == voice][:per_voice]
        table[voice] = {"embedding": F.normalize(embed_records(model, own), dim=1).mean(0, keepdim=True)}
    return table


def load_speaker_table(path: str | Path) -> dict:
    """An ``spk2info.pt`` speaker table (official or minicosy's), weights-only, every embedding
    checked to be finite (a ``ValueError`` naming the file and the speaker otherwise)."""
    table = read_torch_file(path)
    if not isinstance(table, dict):
        raise ValueError(f"{path} holds a {type(table).__name__}, not a speaker table (a dict of speaker ids)")
    check_finite(table, str(path))
    return table


def spk2info_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train spk2info``: the SFT speaker table of the corpus' training voices."""
    p = argparse.ArgumentParser(prog="python -m minicosy.train spk2info")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--checkpoint", default="data/checkpoints/campplus_tiny.pt")
    p.add_argument("--out", default="data/checkpoints/spk2info_tiny.pt")
    a = p.parse_args(argv)
    table = speaker_table(CAMPPlus.from_checkpoint(a.checkpoint), a.corpus)
    torch.save(table, a.out)
    print(f"{len(table)} voices -> {a.out}")
