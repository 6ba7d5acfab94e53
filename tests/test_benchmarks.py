"""The speed benchmarks run (tiny sizes, CPU, seconds): ``benchmarks/latency.py`` side by side with an
"official" checkout, ``benchmarks/first_package.py``, and the timing helpers of ``minicosy.speed``.

The official code cannot be imported here (it needs torchaudio, lightning, hydra, diffusers, omegaconf
...), so ``--official`` is exercised with a stand-in checkout written into a temporary folder: the
official module paths, class names and constructor arguments, each class built on minicosy's module
of the same concept. The benchmark then really imports it, builds it from the yaml, moves its weights
into minicosy's modules and times both in one run; the outputs must agree to the last bit."""
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minicosy.config import get_config
from minicosy.lm import TextSpeechLM
from minicosy.speed import copy_bandwidth, decode_floor, decode_weight_bytes, repeat, summary

from .conftest import load_benchmark

pytestmark = pytest.mark.usefixtures("single_thread")

STAND_IN = {
    "cosyvoice/llm/llm.py": '''
        import torch
        from transformers import Qwen2ForCausalLM


        class Qwen2Encoder(torch.nn.Module):
            def __init__(self, pretrain_path):
                super().__init__()
                self.model = Qwen2ForCausalLM.from_pretrained(pretrain_path)

            def forward_one_step(self, xs, masks, cache=None):
                out = self.model(inputs_embeds=xs, attention_mask=masks[:, -1, :], output_hidden_states=True,
                                 return_dict=True, use_cache=True, past_key_values=cache)
                return out.hidden_states[-1], out.past_key_values


        class Qwen2LM(torch.nn.Module):
            def __init__(self, llm_input_size, llm_output_size, speech_token_size, llm, sampling,
                         length_normalized_loss=True, lsm_weight=0.0, mix_ratio=(5, 15)):
                super().__init__()
                self.llm_embedding = torch.nn.Embedding(2, llm_input_size)
                self.llm = llm
                self.llm_decoder = torch.nn.Linear(llm_output_size, speech_token_size + 3)
                self.speech_embedding = torch.nn.Embedding(speech_token_size + 3, llm_input_size)
                self.sampling, self.mix_ratio = sampling, mix_ratio
        ''',
    "cosyvoice/utils/common.py": '''
        from minicosy.lm_sampling import ras_sampling
        ''',
    "cosyvoice/transformer/upsample_encoder.py": '''
        from minicosy import flow_encoder
        from minicosy.config import FlowConfig


        class PreLookaheadLayer(flow_encoder.PreLookaheadLayer):
            def __init__(self, in_channels, channels, pre_lookahead_len=1):
                super().__init__(in_channels, channels, pre_lookahead_len)


        class Upsample1D(flow_encoder.Upsample1D):
            def __init__(self, channels, out_channels, stride=2):
                super().__init__(channels, out_channels, stride)


        class UpsampleConformerEncoder(flow_encoder.UpsampleConformerEncoder):
            """512-channel look-ahead and up-sampling, 4 up-sampled blocks, up_embed from input_size."""

            def __init__(self, input_size, output_size=256, attention_heads=4, linear_units=2048, num_blocks=6,
                         dropout_rate=0.1, positional_dropout_rate=0.1, attention_dropout_rate=0.0,
                         input_layer="conv2d", pos_enc_layer_type="rel_pos", normalize_before=True,
                         static_chunk_size=0, selfattention_layer_type="rel_selfattn", use_cnn_module=True,
                         macaron_style=True):
                assert (input_layer, pos_enc_layer_type, use_cnn_module, macaron_style) == \\
                    ("linear", "rel_pos_espnet", False, False)
                super().__init__(FlowConfig(input_size=input_size, encoder_size=output_size,
                                            encoder_heads=attention_heads, encoder_linear_units=linear_units,
                                            encoder_blocks=num_blocks, up_encoder_blocks=4, encoder_dropout=dropout_rate,
                                            pre_lookahead_channels=512, upsample_channels=512,
                                            static_chunk_tokens=static_chunk_size))
                self.up_embed = flow_encoder.LinearEmbed(input_size, output_size, dropout_rate)
                self._output_size = output_size

            def output_size(self):
                return self._output_size
        ''',
    "cosyvoice/flow/decoder.py": '''
        from minicosy import flow_estimator
        from minicosy.config import FlowConfig


        class CausalConditionalDecoder(flow_estimator.CausalConditionalDecoder):
            def __init__(self, in_channels, out_channels, channels=(256, 256), dropout=0.05, attention_head_dim=64,
                         n_blocks=1, num_mid_blocks=2, num_heads=4, act_fn="snake", static_chunk_size=50,
                         num_decoding_left_chunks=2):
                super().__init__(FlowConfig(n_mels=out_channels, estimator_channels=channels[0],
                                            estimator_attention_head_dim=attention_head_dim, estimator_n_blocks=n_blocks,
                                            estimator_mid_blocks=num_mid_blocks, estimator_heads=num_heads,
                                            static_chunk_tokens=static_chunk_size // 2))
        ''',
    "cosyvoice/flow/flow_matching.py": '''
        from minicosy import flow
        from minicosy.config import FlowConfig


        class CausalConditionalCFM(flow.CausalConditionalCFM):
            def __init__(self, in_channels, cfm_params, n_spks=1, spk_emb_dim=64, estimator=None):
                super().__init__(FlowConfig(cfg_rate=cfm_params.inference_cfg_rate, estimator_mid_blocks=0,
                                            estimator_n_blocks=0))
                self.estimator = estimator
        ''',
    "cosyvoice/flow/flow.py": '''
        import torch

        from minicosy import flow
        from minicosy.config import FlowConfig
        from minicosy.masks import CHUNK_M, NON_CAUSAL


        class CausalMaskedDiffWithXvec(flow.CausalMaskedDiffWithXvec):
            def __init__(self, input_size=512, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=4096,
                         input_frame_rate=50, only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3,
                         encoder=None, decoder=None):
                torch.nn.Module.__init__(self)
                self.cfg = FlowConfig(input_size=input_size, n_mels=output_size, spk_embed_dim=spk_embed_dim,
                                      vocab_size=vocab_size, token_mel_ratio=token_mel_ratio,
                                      pre_lookahead_len=pre_lookahead_len)
                self.input_embedding = torch.nn.Embedding(vocab_size, input_size)
                self.spk_embed_affine_layer = torch.nn.Linear(spk_embed_dim, output_size)
                self.encoder = encoder
                self.encoder_proj = torch.nn.Linear(encoder.output_size(), output_size)
                self.decoder = decoder

            def inference(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                          embedding, streaming, finalize):
                mel = super().inference(token, prompt_token, prompt_feat, embedding, finalize=finalize,
                                        mask_kind=CHUNK_M if streaming else NON_CAUSAL)
                return mel.float(), None
        ''',
    "cosyvoice/hifigan/f0_predictor.py": '''
        from minicosy import hift


        class ConvRNNF0Predictor(hift.F0Predictor):
            def __init__(self, num_class=1, in_channels=80, cond_channels=512):
                super().__init__(in_channels, cond_channels)
        ''',
    "cosyvoice/hifigan/generator.py": '''
        import torch

        from minicosy import hift
        from minicosy.config import HiFTConfig


        class HiFTGenerator(hift.HiFTGenerator):
            def __init__(self, in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=22050, nsf_alpha=0.1,
                         nsf_sigma=0.003, nsf_voiced_threshold=10, upsample_rates=(8, 8), upsample_kernel_sizes=(16, 16),
                         istft_params=None, resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=None,
                         source_resblock_kernel_sizes=(7, 11), source_resblock_dilation_sizes=None, lrelu_slope=0.1,
                         audio_limit=0.99, f0_predictor=None):
                super().__init__(HiFTConfig(
                    in_channels=in_channels, base_channels=base_channels, nb_harmonics=nb_harmonics,
                    sample_rate=sampling_rate, nsf_alpha=nsf_alpha, nsf_sigma=nsf_sigma,
                    voiced_threshold=nsf_voiced_threshold, upsample_rates=tuple(upsample_rates),
                    upsample_kernel_sizes=tuple(upsample_kernel_sizes), istft_n_fft=istft_params["n_fft"],
                    istft_hop=istft_params["hop_len"], resblock_kernel_sizes=tuple(resblock_kernel_sizes),
                    resblock_dilations=tuple(resblock_dilation_sizes[0]),
                    source_resblock_kernel_sizes=tuple(source_resblock_kernel_sizes),
                    source_resblock_dilations=tuple(source_resblock_dilation_sizes[0]), lrelu_slope=lrelu_slope,
                    audio_limit=audio_limit, f0_channels=f0_predictor.classifier.in_features))
                self.f0_predictor = f0_predictor

            def inference(self, speech_feat, cache_source=torch.zeros(1, 1, 0)):
                return super().inference(speech_feat, cache_source)
        ''',
}


@pytest.fixture
def official_checkout(tmp_path, monkeypatch):
    """The stand-in checkout; ``sys.path`` and the imported ``cosyvoice`` modules are restored after."""
    root = tmp_path / "CosyVoice"
    for rel, text in STAND_IN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        for package in Path(rel).parents[:-1]:                  # cosyvoice/llm, cosyvoice
            (root / package / "__init__.py").touch()
        (root / rel).write_text(textwrap.dedent(text))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield root
    for name in [m for m in sys.modules if m == "cosyvoice" or m.startswith("cosyvoice.")]:
        del sys.modules[name]


def test_latency_side_by_side_with_an_official_checkout(official_checkout, tmp_path, capsys):
    latency = load_benchmark("latency")
    out = tmp_path / "latency.json"
    results = latency.main(["--official", str(official_checkout), "--size", "tiny", "--threads", "1", "--repeats", "2",
                            "--decode-steps", "4", "--skip-e2e", "--skip-stream-total", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "official code from" in printed and "LM decode floor" in printed
    stages = results["stages"]
    compared = ["LM prefill, 150 rows", "LM decode per token, 150-row prefix", "flow 50 tokens, no prompt, 10 NFE + CFG",
                "flow first streaming chunk, 28 tokens after 75", "HiFT 2 s of mel"]
    for name in compared:
        row = stages[name]
        assert row["official"]["n"] == row["minicosy"]["n"] >= 2 and row["ratio_median"] > 0
        assert row["max_abs_diff"] == 0.0, name           # the stand-in computes with minicosy's modules
    assert "official" not in stages["flow first streaming chunk, incremental (minicosy)"]
    assert json.loads(out.read_text())["stages"].keys() == stages.keys()
    floor = results["decode_floor"]
    assert floor["fp32_bytes"] == 2 * floor["bf16_bytes"] > 0 and floor["copy_bandwidth_Bps"] > 0


def test_latency_refuses_a_folder_that_is_not_the_official_code(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkout of FunAudioLLM/CosyVoice"):
        load_benchmark("latency").main(["--official", str(tmp_path), "--size", "tiny", "--skip-e2e"])


def test_timing_helpers_and_the_decode_floor():
    assert summary([0.3, 0.1, 0.2, 0.5, 0.4]) == {"min": 0.1, "median": 0.3, "p90": 0.5, "n": 5}
    assert summary([float(k) for k in range(1, 21)])["p90"] == 18.0
    with pytest.raises(ValueError, match="no times"):
        summary([])
    calls = []
    assert repeat(lambda: calls.append(1), 3, warmup=2)["n"] == 3 and len(calls) == 5
    with torch.device("meta"):
        full = TextSpeechLM(get_config("cosyvoice2_0p5b").lm, 151936)
    # 24 layers of 14.91 M parameters, the final norm and the 896 x 6564 head (+ bias): 363.8 M
    assert decode_weight_bytes(full, 4) == 4 * (24 * 14_912_384 + 896 + 896 * 6564 + 6564)
    floor = decode_floor(full, 1e10)
    assert floor["fp32_s"] == pytest.approx(0.1455, abs=1e-4) and floor["bf16_s"] == pytest.approx(floor["fp32_s"] / 2)
    assert copy_bandwidth(nbytes=1 << 22, repeats=2) > 1e8


def test_first_package_on_the_tiny_model(tmp_path):
    first_package = load_benchmark("first_package")
    fresh = first_package.main(["--requests", "2", "--warmup", "1", "--threads", "1"])
    stages = fresh["stages"]
    assert fresh["package_tokens"] == 15 and fresh["prompt_tokens"] == 75 and fresh["lm_steps"] == 15 + 3 - 1
    assert all(stages[s]["n"] == 2 and 0 < stages[s]["median"] <= stages[s]["p90"] for s in stages)
    medians = sum(stages[s]["median"] for s in first_package.STAGES)
    assert stages["first_package_s"]["min"] <= medians * 1.5 and fresh["parity"] is None
    eq11 = fresh["eq11"]
    assert eq11["L_TTS"] == pytest.approx(15 * (eq11["d_lm"] + eq11["d_fm"] + eq11["d_voc"]))
    assert fresh["rtf"] == pytest.approx((eq11["d_lm"] + eq11["d_fm"] + eq11["d_voc"]) * 25)
    out = tmp_path / "first_package.json"
    fast = first_package.main(["--requests", "2", "--warmup", "1", "--threads", "1", "--registered", "--incremental",
                               "--static-cache", "--compile", "--compile-backend", "eager", "--dtype", "bf16",
                               "--hift-dtype", "bf16", "--json", str(out)])
    assert json.loads(out.read_text())["config"]["registered"] is True
    assert fast["stages"]["frontend_s"]["median"] < stages["frontend_s"]["median"]    # no prompt to process
    parity = fast["parity"]                     # measured 0.099, 1.1e-4, 0.086, 0.028 (cf. test_precision.py)
    assert 0 < parity["lm_logp_max_abs"] < 1.5 and parity["lm_kl"] < 1e-3
    assert 0 < parity["mel_max_abs"] < 0.4 and parity["audio_rms_rel"] < 0.1
    with pytest.raises(ValueError, match="--compile needs --static-cache"):
        first_package.main(["--compile"])
