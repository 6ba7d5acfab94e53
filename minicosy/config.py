"""All hyperparameters of minicosy, as plain dataclasses, with two presets.

* ``tiny``            -- trainable in minutes on 2 CPU cores (the notebooks' scale).
* ``cosyvoice2_0p5b`` -- the official CosyVoice2-0.5B sizes (``shared/reference/manifests``,
  ``NOTES.md`` §2-§6), so the same classes can load the released checkpoint.

Every component reads its own sub-config; nothing is built from yaml. Rates follow the paper:
25 Hz speech tokens (§2.2), 50 Hz mel frames at 24 kHz (§2.4), hence ``token_mel_ratio`` = 2.

Usage::

    from minicosy.config import get_config
    cfg = get_config("tiny")
    cfg.lm.hidden_size, cfg.flow.estimator_channels
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace


@dataclass
class FeatureConfig:
    """The three front-end features of the official system (NOTES.md §6)."""

    sample_rate: int = 24000          # output audio / flow / vocoder rate
    n_fft: int = 1920                 # flow mel: 80 ms window at 24 kHz
    hop_length: int = 480             # 50 frames/s
    win_length: int = 1920
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    tokenizer_sample_rate: int = 16000  # Whisper log-mel for the speech tokenizer
    whisper_n_fft: int = 400
    whisper_hop_length: int = 160     # 100 frames/s
    whisper_n_mels: int = 128
    speaker_sample_rate: int = 16000  # Kaldi fbank for CAM++
    fbank_n_mels: int = 80
    fbank_frame_length_ms: float = 25.0
    fbank_frame_shift_ms: float = 10.0


@dataclass
class TextTokenizerConfig:
    """BPE text tokenizer (§2.1)."""

    vocab_size: int = 151936          # Qwen2 vocabulary (full); the tiny BPE is trained to this size
    mask_multichar_cjk: bool = True   # §2.1: BPE tokens covering > 1 CJK character are never emitted
    units: str = "bpe"                # "bpe" (§2.1) or "phone": reading units (text_tokenizer.UnitTokenizer)


@dataclass
class SpeechTokenizerConfig:
    """ASR-supervised FSQ speech tokenizer (§2.2): Encoder1 -> FSQ -> Encoder2 -> ASR decoder."""

    n_mels: int = 128
    d_model: int = 1280
    n_heads: int = 20
    encoder1_layers: int = 6
    encoder2_layers: int = 6
    fsmn_kernel: int = 31
    downsample: int = 4               # 100 Hz Whisper frames -> 25 Hz tokens
    fsq_dim: int = 8                  # D in eq. 1-2
    fsq_levels: int = 1               # K: each digit in [-K, K]; (2K+1)^D codes
    quant_layernorm: bool = False     # a LayerNorm on H before Proj_down (not in the official model)
    pad_to_tokens: bool = False       # zero-pad audio to whole tokens (640 samples): the tiny recipe, not official
    vq_codebook_size: int = 4096      # VQ baseline for the comparison (Table 4)

    @property
    def codebook_size(self) -> int:
        """Number of FSQ codes, (2K+1)^D (eq. 2)."""
        return (2 * self.fsq_levels + 1) ** self.fsq_dim


@dataclass
class LMConfig:
    """Qwen2 text-speech LM (§2.3) and its ids (NOTES.md §2)."""

    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attn_implementation: str = "sdpa"  # HF attention kernel ("sdpa" or "eager"); both match the golden
    speech_token_size: int = 6561     # = (2K+1)^D speech codes
    sos_id: int = 0                   # rows of the 2-row llm_embedding
    task_id: int = 1
    mix_ratio: tuple[int, int] = (5, 15)  # N text : M speech in the streaming layout (see UNIT_MIX_RATIO)
    min_token_text_ratio: float = 2.0     # generated speech tokens per text id, at least ...
    max_token_text_ratio: float = 20.0    # ... and at most (§2.3's decoding bounds; see UNIT_TOKEN_TEXT_RATIO)
    top_p: float = 0.8                # RAS sampling
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    align_ctc_weight: float = 0.0     # training-only alignment aid (lm_align.py); 0: the paper's loss alone
    # zero-shot (§2.3): the LM continues the prompt's text and speech tokens (the paper). False: only
    # the flow gets the prompt, as in cross-lingual synthesis (a tiny LM loses words continuing a voice
    # it never heard; set by a model folder's "inference", see pipeline.set_inference)
    in_context_prompt: bool = True

    @property
    def eos_id(self) -> int:
        return self.speech_token_size

    @property
    def fill_id(self) -> int:
        return self.speech_token_size + 2

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, the unused 6562 and the fill token (NOTES.md §2)."""
        return tuple(self.speech_token_size + i for i in range(3))


# The LM's length bounds (speech tokens per text id) belong to the text units: for BPE pieces (§2.1)
# the official values, 2 and 20 tokens at 25 Hz; a reading unit (a phone, a word gap, a punctuation
# mark) spans 1.3-2.7 tokens in the small corpus' English utterances (median 1.65), so the BPE
# minimum of 2 would force the LM past its end of speech (tests/test_lm.py checks the bounds there).
UNIT_TOKEN_TEXT_RATIO = {"bpe": (2.0, 20.0), "phone": (1.0, 6.0)}

# The streaming (bistream) layout's N text : M speech (§2.3) belongs to the text units too. Training
# uses it only for an utterance whose speech/text ratio exceeds M/N (official rule): then the text
# read so far stays ahead of the speech. The paper's 5:15 suits BPE (median 3.9 tokens per id); a
# reading unit spans a median 1.65 tokens, so 5:15 would put no English utterance in the layout and
# leave English streaming untrained. 12:15 keeps the paper's M and admits nearly all of them, the
# text 12 units ahead per 15 tokens (about 9 units' worth; notebook 03 §7, tests/test_lm.py).
UNIT_MIX_RATIO = {"bpe": (5, 15), "phone": (12, 15)}


def lm_for_units(lm: LMConfig, units: str) -> LMConfig:
    """``lm`` with the length bounds (:data:`UNIT_TOKEN_TEXT_RATIO`) and the streaming mix ratio
    (:data:`UNIT_MIX_RATIO`) of text ``units``."""
    if units not in UNIT_TOKEN_TEXT_RATIO:
        raise ValueError(f"text units must be one of {sorted(UNIT_TOKEN_TEXT_RATIO)}, got {units!r}")
    low, high = UNIT_TOKEN_TEXT_RATIO[units]
    return replace(lm, min_token_text_ratio=low, max_token_text_ratio=high, mix_ratio=UNIT_MIX_RATIO[units])


@dataclass
class FlowConfig:
    """Chunk-aware causal flow matching (§2.4; NOTES.md §4)."""

    vocab_size: int = 6561
    input_size: int = 512             # token embedding
    encoder_size: int = 512
    encoder_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_blocks: int = 6           # before up-sampling
    up_encoder_blocks: int = 4        # after up-sampling (hard-coded 4 in the official encoder)
    encoder_dropout: float = 0.1      # embedding, positional, attention, residual and FFN dropout
    pre_lookahead_len: int = 3        # P
    pre_lookahead_channels: int = 512  # hidden width of the look-ahead conv (hard-coded 512 officially)
    upsample_channels: int = 512      # Upsample1D output = up_embed input (hard-coded 512 officially)
    token_mel_ratio: int = 2
    n_mels: int = 80
    spk_embed_dim: int = 192
    estimator_channels: int = 256
    estimator_attention_head_dim: int = 64
    estimator_heads: int = 8
    estimator_n_blocks: int = 4
    estimator_mid_blocks: int = 12
    static_chunk_tokens: int = 25     # M tokens -> 2M mel frames
    n_timesteps: int = 10             # NFE
    cfg_rate: float = 0.7             # beta in eq. 10
    training_cfg_rate: float = 0.2
    sigma_min: float = 1e-6
    prompt_mask_ratio: tuple[float, float] = (0.7, 1.0)  # share of final frames masked (§2.4)
    training_recipe: str = "paper"    # "paper" (§2.4: L1, 4 masks) or "official" (NOTES.md §4a)


@dataclass
class HiFTConfig:
    """HiFT vocoder (NOTES.md §5)."""

    in_channels: int = 80             # mel bins
    sample_rate: int = 24000          # 24 kHz selects SineGen2 in the official code
    base_channels: int = 512
    nb_harmonics: int = 8
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilations: tuple[int, ...] = (1, 3, 5)
    istft_n_fft: int = 16
    istft_hop: int = 4
    f0_channels: int = 512
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    voiced_threshold: float = 10.0
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99


@dataclass
class CAMPPlusConfig:
    """CAM++ speaker embedding (Fig. 1 footnote; 192-d; the official ``campplus.onnx``, NOTES.md §6)."""

    n_mels: int = 80
    embedding_size: int = 192
    growth_rate: int = 32             # channels each CAM dense layer adds
    bn_size: int = 4                  # bottleneck width = bn_size * growth_rate
    init_channels: int = 128          # TDNN layer output
    block_layers: tuple[int, ...] = (12, 24, 16)  # CAM dense layers per D-TDNN block
    kernel_sizes: tuple[int, ...] = (3, 3, 3)     # per block
    dilations: tuple[int, ...] = (1, 2, 2)        # per block
    fcm_channels: int = 32            # FCM 2-D conv front-end width
    fcm_blocks: tuple[int, ...] = (2, 2)          # residual blocks per FCM stage
    seg_len: int = 100                # CAM segment pooling length (frames after the TDNN stride 2)


@dataclass
class StreamingConfig:
    """Streaming orchestration (§2.5; NOTES.md §3)."""

    token_hop_len: int = 25
    token_max_hop_len: int = 100
    stream_scale_factor: int = 2
    mel_cache_len: int = 8
    source_cache_len: int = 8 * 480


@dataclass
class CorpusConfig:
    """The self-made multi-speaker corpus (``python -m minicosy.data build``)."""

    root: str = "data/corpus"
    texts: str = "data/texts"
    sample_rate: int = 24000
    seed: int = 1234
    dev_fraction: float = 0.05
    test_fraction: float = 0.05
    min_voices: int = 8
    # instruct sub-corpus (§2.6): training sentences per language, each under every condition
    instruct_sentences: tuple[tuple[str, int], ...] = (("en", 20), ("zh", 10), ("ja", 5))
    # the large corpus (``build --size large``, never in CI): the small corpus plus distinct English
    # sentences of data/texts/large, concentrated on a few voices that pocketsphinx reads well
    large_root: str = "data/corpus_large"
    large_voices: tuple[tuple[str, int], ...] = (("hibari_heart", 6500), ("flite_awb", 6500), ("flite_slt", 6500))
    large_thin: int = 500             # sentences for each other English training voice
    large_dev_fraction: float = 0.02  # of the large training sentences (by hash); the rest is train
    large_eval: int = 60              # more sentences, read by every English voice: the "eval" split
    # a second helping of training text for the LM (issue 20: its held-out perplexity stopped
    # falling on the first), drawn after the eval sentences so that every split above stays as it was
    large_more: tuple[tuple[str, int], ...] = (("hibari_heart", 6000), ("flite_awb", 6000), ("flite_slt", 6000))
    large_more_thin: int = 1000
    large_instruct: int = 600         # large-corpus training sentences in <large_root>/instruct (§2.6)


@dataclass
class MiniCosyConfig:
    """The whole system; ``name`` is the preset it came from."""

    name: str = "cosyvoice2_0p5b"
    features: FeatureConfig = field(default_factory=FeatureConfig)
    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    speech_tokenizer: SpeechTokenizerConfig = field(default_factory=SpeechTokenizerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    campplus: CAMPPlusConfig = field(default_factory=CAMPPlusConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    @property
    def token_rate(self) -> int:
        """Speech tokens per second (25 Hz, §2.2)."""
        return self.mel_rate // self.flow.token_mel_ratio

    @property
    def mel_rate(self) -> int:
        """Mel frames per second (50 Hz, §2.4)."""
        return self.features.sample_rate // self.features.hop_length

    def to_dict(self) -> dict:
        return asdict(self)


def cosyvoice2_0p5b() -> MiniCosyConfig:
    """The official CosyVoice2-0.5B sizes: the dataclass defaults."""
    return MiniCosyConfig(name="cosyvoice2_0p5b")


def tiny() -> MiniCosyConfig:
    """A model small enough to train every component on 2 CPU cores in minutes."""
    cfg = MiniCosyConfig(name="tiny")
    cfg.text = TextTokenizerConfig(vocab_size=2000)
    cfg.speech_tokenizer = SpeechTokenizerConfig(
        d_model=128, n_heads=4, encoder1_layers=2, encoder2_layers=2, fsmn_kernel=11, quant_layernorm=True,
        pad_to_tokens=True)
    cfg.lm = lm_for_units(LMConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2), cfg.text.units)
    cfg.flow = FlowConfig(input_size=128, encoder_size=128, encoder_heads=2,
                          encoder_linear_units=256, encoder_blocks=2, up_encoder_blocks=2,
                          estimator_channels=128, estimator_attention_head_dim=32,
                          estimator_heads=2, estimator_n_blocks=1, estimator_mid_blocks=2,
                          pre_lookahead_channels=128, upsample_channels=128)
    cfg.hift = HiFTConfig(base_channels=64, f0_channels=64)
    cfg.campplus = CAMPPlusConfig(growth_rate=16, init_channels=32, block_layers=(2, 4, 3), fcm_channels=8)
    return cfg


PRESETS = {"tiny": tiny, "cosyvoice2_0p5b": cosyvoice2_0p5b}


def get_config(name: str = "tiny") -> MiniCosyConfig:
    """A fresh copy of a preset; raises ``ValueError`` for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())
