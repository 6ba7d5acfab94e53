"""The official CosyVoice2-0.5B folder, read into and written from minicosy's modules (NOTES.md §1).

``cosyvoice2.yaml`` is HyperPyYAML: its ``!new:``/``!name:`` tags would build the official
classes. Here it is read as data only (tags become plain dicts with a ``_tag`` entry, ``!ref``
resolves against top-level keys) and mapped onto minicosy's dataclass configs. Nothing is ever
instantiated from a tag.

Usage::

    parts = read_official_folder("pretrained_models/CosyVoice2-0.5B")   # modules + config
    write_official_folder(tts, "my_folder")                              # same file layout back
"""
from __future__ import annotations

import dataclasses
import numbers
import re
import shutil
import warnings
from pathlib import Path

import torch
import yaml

from .campplus import CAMPPlus, CAMPPlusONNX, load_speaker_table
from .campplus import export_onnx as export_campplus_onnx
from .config import MiniCosyConfig, get_config
from .flow import CausalMaskedDiffWithXvec, load_flow_state_dict
from .frontend import Frontend
from .hift import HiFTGenerator, load_official_hift
from .lm import TextSpeechLM, lm_config_from_qwen_folder, load_official_llm, qwen2_config
from .speech_tokenizer import OnnxSpeechTokenizer, SpeechTokenizer
from .speech_tokenizer import export_onnx as export_tokenizer_onnx
from .text_tokenizer import TextTokenizer

QWEN_DIR = "CosyVoice-BlankEN"
EXTRA = "minicosy_extra"       # sizes the official code hard-codes, written only for other model sizes
HARD_CODED_FLOW = ("up_encoder_blocks", "pre_lookahead_channels", "upsample_channels")
FILES = {"cosyvoice2.yaml": "hyperparameters (read as data)", "llm.pt": "the LM state dict",
         "flow.pt": "the flow state dict", "hift.pt": "the HiFT state dict",
         "campplus.onnx": "the CAM++ speaker model", "speech_tokenizer_v2.onnx": "the speech tokenizer",
         QWEN_DIR: "the Qwen2 folder (config.json + vocab.json, merges.txt, tokenizer_config.json)"}


class _DataLoader(yaml.SafeLoader):
    """SafeLoader that reads any ``!tag`` node as plain data instead of refusing it."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return {"_tag": suffix, **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return {"_tag": suffix, "_args": loader.construct_sequence(node, deep=True)}
    return {"_tag": suffix, "_value": loader.construct_scalar(node)}


_DataLoader.add_multi_constructor("!", _tagged)


def _resolve(node, top: dict):
    """Replace ``!ref <key>`` (and products like ``<a> * <b>``) by the top-level values."""
    if isinstance(node, dict):
        if node.get("_tag") == "ref" and "_value" in node:
            expr = str(node["_value"])
            values = [top.get(k) for k in re.findall(r"<([^>]+)>", expr)]
            if re.fullmatch(r"\s*<[^>]+>\s*", expr):
                return _resolve(values[0], top)
            if all(isinstance(v, (int, float)) for v in values) and re.fullmatch(r"[\s<>\w*]+", expr):
                product = 1
                for v in values:
                    product *= v
                return product
            return expr
        return {k: _resolve(v, top) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, top) for v in node]
    return node


def read_yaml(path: str | Path) -> dict:
    """``cosyvoice2.yaml`` as nested dicts/lists/scalars; ``!ref`` resolved, tags kept as ``_tag``."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_DataLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of hyperparameters, got {type(raw).__name__}")
    return _resolve(raw, raw)


def _section(doc: dict, path: str, key: str) -> dict:
    node = doc
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise ValueError(f"{path}: missing section {key!r}")
    return node


def config_from_yaml(path: str | Path) -> MiniCosyConfig:
    """minicosy's full-size config with every value the yaml states (sizes, sampling, solver); a
    value of the wrong kind (text where a number belongs) is a ``ValueError`` naming the field."""
    doc = read_yaml(path)
    try:
        cfg = _config_from_doc(doc, str(path))
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: a hyperparameter has the wrong type ({e})") from None
    default = get_config("cosyvoice2_0p5b")
    for section in ("lm", "flow", "hift", "features"):
        for field in dataclasses.fields(getattr(cfg, section)):
            value, like = getattr(getattr(cfg, section), field.name), getattr(getattr(default, section), field.name)
            values, likes = (value, like) if isinstance(like, tuple) else ((value,), (like,))
            if any(isinstance(x, numbers.Real) and not isinstance(x, bool) and
                   (isinstance(v, bool) or not isinstance(v, numbers.Real)) for x, v in zip(likes, values)):
                raise ValueError(f"{path}: {section}.{field.name} must be a number, got {value!r}")
    return cfg


def _config_from_doc(doc: dict, path: str) -> MiniCosyConfig:
    cfg = get_config("cosyvoice2_0p5b")
    llm, flow, hift = (_section(doc, path, k) for k in ("llm", "flow", "hift"))
    sampling = llm.get("sampling", {})
    cfg.lm = dataclasses.replace(cfg.lm, speech_token_size=llm.get("speech_token_size", cfg.lm.speech_token_size),
                                 mix_ratio=tuple(llm.get("mix_ratio", cfg.lm.mix_ratio)),
                                 **{k: sampling[k] for k in ("top_p", "top_k", "win_size", "tau_r") if k in sampling})
    enc, dec = flow.get("encoder", {}), flow.get("decoder", {})
    cfm, est = dec.get("cfm_params", {}).get("content", {}), dec.get("estimator", {})
    f = cfg.flow
    cfg.flow = dataclasses.replace(
        f, vocab_size=flow.get("vocab_size", f.vocab_size), input_size=flow.get("input_size", f.input_size),
        n_mels=flow.get("output_size", f.n_mels), spk_embed_dim=flow.get("spk_embed_dim", f.spk_embed_dim),
        token_mel_ratio=flow.get("token_mel_ratio", f.token_mel_ratio),
        pre_lookahead_len=flow.get("pre_lookahead_len", f.pre_lookahead_len),
        encoder_size=enc.get("output_size", f.encoder_size), encoder_heads=enc.get("attention_heads", f.encoder_heads),
        encoder_linear_units=enc.get("linear_units", f.encoder_linear_units),
        encoder_blocks=enc.get("num_blocks", f.encoder_blocks), encoder_dropout=enc.get("dropout_rate", f.encoder_dropout),
        estimator_channels=est.get("channels", [f.estimator_channels])[0],
        estimator_attention_head_dim=est.get("attention_head_dim", f.estimator_attention_head_dim),
        estimator_n_blocks=est.get("n_blocks", f.estimator_n_blocks),
        estimator_mid_blocks=est.get("num_mid_blocks", f.estimator_mid_blocks),
        estimator_heads=est.get("num_heads", f.estimator_heads),
        static_chunk_tokens=est.get("static_chunk_size", f.static_chunk_tokens * f.token_mel_ratio) // f.token_mel_ratio,
        sigma_min=float(cfm.get("sigma_min", f.sigma_min)), cfg_rate=float(cfm.get("inference_cfg_rate", f.cfg_rate)),
        training_cfg_rate=float(cfm.get("training_cfg_rate", f.training_cfg_rate)))
    h, istft = cfg.hift, hift.get("istft_params", {})
    cfg.hift = dataclasses.replace(
        h, in_channels=hift.get("in_channels", h.in_channels), base_channels=hift.get("base_channels", h.base_channels),
        nb_harmonics=hift.get("nb_harmonics", h.nb_harmonics), sample_rate=hift.get("sampling_rate", h.sample_rate),
        nsf_alpha=hift.get("nsf_alpha", h.nsf_alpha), nsf_sigma=hift.get("nsf_sigma", h.nsf_sigma),
        voiced_threshold=float(hift.get("nsf_voiced_threshold", h.voiced_threshold)),
        upsample_rates=tuple(hift.get("upsample_rates", h.upsample_rates)),
        upsample_kernel_sizes=tuple(hift.get("upsample_kernel_sizes", h.upsample_kernel_sizes)),
        istft_n_fft=istft.get("n_fft", h.istft_n_fft), istft_hop=istft.get("hop_len", h.istft_hop),
        resblock_kernel_sizes=tuple(hift.get("resblock_kernel_sizes", h.resblock_kernel_sizes)),
        resblock_dilations=tuple(hift.get("resblock_dilation_sizes", [h.resblock_dilations])[0]),
        source_resblock_kernel_sizes=tuple(hift.get("source_resblock_kernel_sizes", h.source_resblock_kernel_sizes)),
        source_resblock_dilations=tuple(hift.get("source_resblock_dilation_sizes", [h.source_resblock_dilations])[0]),
        lrelu_slope=hift.get("lrelu_slope", h.lrelu_slope), audio_limit=hift.get("audio_limit", h.audio_limit),
        f0_channels=hift.get("f0_predictor", {}).get("cond_channels", h.f0_channels))
    cfg.features = dataclasses.replace(cfg.features, sample_rate=doc.get("sample_rate", cfg.features.sample_rate))
    cfg.flow = dataclasses.replace(cfg.flow, **doc.get(EXTRA, {}).get("flow", {}))
    return cfg


OPTIONAL = ("campplus.onnx", "speech_tokenizer_v2.onnx")    # only prompts need them
QWEN_FILES = ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def check_official_folder(folder: str | Path) -> Path:
    """``FileNotFoundError`` naming every file of the official layout that is missing, the Qwen2
    folder's tokenizer files included. The two ONNX files are optional: without them the folder
    still synthesises from a registered speaker (``spk2info.pt``); a warning says so."""
    folder = Path(folder)
    missing = [f"{name} ({what})" for name, what in FILES.items()
               if name not in OPTIONAL and not (folder / name).exists()]
    missing += [f"{QWEN_DIR}/{name}" for name in QWEN_FILES if (folder / QWEN_DIR).is_dir() and not (folder / QWEN_DIR / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete CosyVoice2-0.5B folder; missing: " + "; ".join(missing))
    absent = [name for name in OPTIONAL if not (folder / name).exists()]
    if absent:
        warnings.warn(f"{folder} has no {' or '.join(absent)}: prompt audio cannot be used (zero-shot, cross-lingual, "
                      "instruct); synthesis from a registered speaker (spk2info.pt) still works", stacklevel=3)
    return folder


class MissingOnnx:
    """Stands in for an official ONNX model that the folder lacks: any use is a clear error."""

    def __init__(self, path: Path):
        self.path = path

    def _refuse(self, *args, **kwargs):
        raise FileNotFoundError(f"{self.path} is missing, so prompt audio cannot be used; synthesise from a registered "
                                "speaker (inference_sft / zero_shot_spk_id) or add the file")

    tokenize = embed = _refuse


def read_official_folder(folder: str | Path) -> dict:
    """minicosy modules holding the official folder's weights: ``config``, ``frontend``, ``lm``,
    ``flow``, ``hift`` and ``spk2info`` (keyword arguments of :class:`~minicosy.pipeline.CosyVoice2`).
    Weights load strictly; a wrong key or shape raises a ``ValueError`` naming it."""
    folder = check_official_folder(folder)
    cfg = config_from_yaml(folder / "cosyvoice2.yaml")
    cfg.lm, _ = lm_config_from_qwen_folder(folder / QWEN_DIR, cfg.lm)
    lm = load_official_llm(folder / "llm.pt", qwen_dir=folder / QWEN_DIR, cfg=cfg.lm)
    flow = CausalMaskedDiffWithXvec(cfg.flow)
    load_flow_state_dict(flow, folder / "flow.pt")
    hift = load_official_hift(folder / "hift.pt", cfg.hift)
    onnx_or_missing = {name: (model(folder / name) if (folder / name).exists() else MissingOnnx(folder / name))
                       for name, model in (("speech_tokenizer_v2.onnx", OnnxSpeechTokenizer), ("campplus.onnx", CAMPPlusONNX))}
    # prompts as the official front end reads them: torchaudio's resampler, tokens of the unpadded log-mel
    frontend = Frontend(TextTokenizer.from_pretrained(folder / QWEN_DIR), onnx_or_missing["speech_tokenizer_v2.onnx"],
                        onnx_or_missing["campplus.onnx"], cfg.features.sample_rate, cfg.flow.token_mel_ratio,
                        resampling="sinc")
    spk2info = load_speaker_table(folder / "spk2info.pt") if (folder / "spk2info.pt").exists() else {}
    return {"config": cfg, "frontend": frontend, "lm": lm, "flow": flow.eval(), "hift": hift, "spk2info": spk2info}


def yaml_text(cfg: MiniCosyConfig) -> str:
    """A ``cosyvoice2.yaml`` for ``cfg`` with the official structure, tags and every argument of the
    official recipe (``examples/libritts/cosyvoice2/conf/cosyvoice2.yaml``, model part), so that the
    official code builds the same modules from it (``benchmarks/latency.py --official`` does)."""
    f, h, lm = cfg.flow, cfg.hift, cfg.lm
    official = get_config("cosyvoice2_0p5b").flow
    extra = {k: getattr(f, k) for k in HARD_CODED_FLOW if getattr(f, k) != getattr(official, k)}
    extra_text = f"\n# not configurable in the official code (hard-coded there)\n{EXTRA}:\n    flow: {extra}\n" if extra else ""
    return f"""# written by minicosy.official.write_official_folder (official cosyvoice2.yaml structure)
sample_rate: {cfg.features.sample_rate}
llm_input_size: {lm.hidden_size}
llm_output_size: {lm.hidden_size}
spk_embed_dim: {f.spk_embed_dim}
qwen_pretrain_path: ''
token_frame_rate: {cfg.token_rate}
token_mel_ratio: {f.token_mel_ratio}
chunk_size: {f.static_chunk_tokens}
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {lm.speech_token_size}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: {list(lm.mix_ratio)}
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: {lm.top_p}
        top_k: {lm.top_k}
        win_size: {lm.win_size}
        tau_r: {lm.tau_r}

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {f.input_size}
    output_size: {f.n_mels}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {f.vocab_size}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: {f.pre_lookahead_len}
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {f.encoder_size}
        attention_heads: {f.encoder_heads}
        linear_units: {f.encoder_linear_units}
        num_blocks: {f.encoder_blocks}
        dropout_rate: {f.encoder_dropout}
        positional_dropout_rate: {f.encoder_dropout}
        attention_dropout_rate: {f.encoder_dropout}
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {f.input_size}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: {3 * f.n_mels}
        n_spks: 1
        spk_emb_dim: {f.n_mels}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: {f.sigma_min}
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: {f.training_cfg_rate}
                inference_cfg_rate: {f.cfg_rate}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: {4 * f.n_mels}
            out_channels: {f.n_mels}
            channels: [{f.estimator_channels}]
            dropout: 0.0
            attention_head_dim: {f.estimator_attention_head_dim}
            n_blocks: {f.estimator_n_blocks}
            num_mid_blocks: {f.estimator_mid_blocks}
            num_heads: {f.estimator_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {h.in_channels}
    base_channels: {h.base_channels}
    nb_harmonics: {h.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {h.nsf_alpha}
    nsf_sigma: {h.nsf_sigma}
    nsf_voiced_threshold: {h.voiced_threshold}
    upsample_rates: {list(h.upsample_rates)}
    upsample_kernel_sizes: {list(h.upsample_kernel_sizes)}
    istft_params:
        n_fft: {h.istft_n_fft}
        hop_len: {h.istft_hop}
    resblock_kernel_sizes: {list(h.resblock_kernel_sizes)}
    resblock_dilation_sizes: {[list(h.resblock_dilations)] * len(h.resblock_kernel_sizes)}
    source_resblock_kernel_sizes: {list(h.source_resblock_kernel_sizes)}
    source_resblock_dilation_sizes: {[list(h.source_resblock_dilations)] * len(h.source_resblock_kernel_sizes)}
    lrelu_slope: {h.lrelu_slope}
    audio_limit: {h.audio_limit}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {h.in_channels}
        cond_channels: {h.f0_channels}
""" + extra_text


def write_official_folder(tts, folder: str | Path, text_tokenizer_dir: str | Path,
                          speech_tokenizer: SpeechTokenizer | None = None, speaker_model: CAMPPlus | None = None) -> Path:
    """Write ``tts`` (a :class:`~minicosy.pipeline.CosyVoice2`) in the official file layout: state
    dicts with official key names, ``cosyvoice2.yaml``, the Qwen folder (config.json + the tokenizer
    files copied from ``text_tokenizer_dir``) and the two ONNX models, exported from the given
    torch modules or copied when the pipeline already runs ONNX files."""
    folder = Path(folder)
    (folder / QWEN_DIR).mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(tts.config, flow=tts.flow.cfg, lm=tts.lm.cfg, hift=tts.hift.cfg)
    for name, module in (("llm.pt", tts.lm), ("flow.pt", tts.flow), ("hift.pt", tts.hift)):
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()
                    if not k.startswith("align_head.")}, folder / name)      # a training-only head (lm_align)
    (folder / "cosyvoice2.yaml").write_text(yaml_text(cfg))
    qwen2_config(tts.lm.cfg, tts.lm.text_vocab_size).to_json_file(str(folder / QWEN_DIR / "config.json"))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(Path(text_tokenizer_dir) / name, folder / QWEN_DIR / name)
    for module, name, export in ((speech_tokenizer or tts.frontend.speech_tokenizer, "speech_tokenizer_v2.onnx",
                                  export_tokenizer_onnx),
                                 (speaker_model or tts.frontend.speaker_model, "campplus.onnx", export_campplus_onnx)):
        if isinstance(module, (OnnxSpeechTokenizer, CAMPPlusONNX)):
            shutil.copy(module.path, folder / name)
        else:
            export(module, folder / name)
    return folder


def random_full_size(cfg: MiniCosyConfig | None = None, text_vocab_size: int | None = None, seed: int = 0,
                     parts: tuple[str, ...] = ("lm", "flow", "hift", "campplus")) -> dict:
    """Randomly initialised modules of a config (default: the full-size CosyVoice2-0.5B), in eval
    mode, for round trips and speed tests: any of ``lm``, ``flow``, ``hift``, ``campplus`` and
    ``speech_tokenizer`` (the full-size tokenizer alone has ~240 M parameters: ask for it)."""
    cfg = cfg or get_config("cosyvoice2_0p5b")
    builders = {"lm": lambda: TextSpeechLM(cfg.lm, text_vocab_size or cfg.text.vocab_size),
                "flow": lambda: CausalMaskedDiffWithXvec(cfg.flow), "hift": lambda: HiFTGenerator(cfg.hift),
                "campplus": lambda: CAMPPlus(cfg.campplus),
                "speech_tokenizer": lambda: SpeechTokenizer(cfg.speech_tokenizer, ["<blank>", "a"])}
    unknown = set(parts) - builders.keys()
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(builders)}")
    torch.manual_seed(seed)
    return {name: builders[name]().eval() for name in parts}
