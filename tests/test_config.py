"""The two presets: rates from the paper, full-size numbers from the official manifests."""
import json

import pytest

from minicosy.config import PRESETS, get_config

from .conftest import MANIFESTS, need


def test_presets_and_rates():
    assert set(PRESETS) == {"tiny", "cosyvoice2_0p5b"}
    for name in PRESETS:
        cfg = get_config(name)
        assert cfg.name == name
        assert cfg.token_rate == 25 and cfg.mel_rate == 50            # §2.2, §2.4
        assert cfg.speech_tokenizer.codebook_size == 3 ** 8 == cfg.lm.speech_token_size
        assert (cfg.lm.eos_id, cfg.lm.fill_id) == (6561, 6563)
        assert cfg.lm.hidden_size % cfg.lm.num_attention_heads == 0
        assert cfg.lm.num_attention_heads % cfg.lm.num_key_value_heads == 0


def test_get_config_returns_fresh_copies_and_rejects_unknown_names():
    a, b = get_config("tiny"), get_config("tiny")
    a.lm.hidden_size = 1
    assert b.lm.hidden_size != 1
    with pytest.raises(ValueError, match="unknown config preset"):
        get_config("huge")


def test_tiny_is_much_smaller_than_full():
    tiny, full = get_config("tiny"), get_config("cosyvoice2_0p5b")
    assert tiny.lm.hidden_size * 4 <= full.lm.hidden_size
    assert tiny.flow.encoder_size * 4 <= full.flow.encoder_size
    assert tiny.hift.base_channels * 4 <= full.hift.base_channels


def _shape(manifest: str, key: str) -> list[int]:
    keys = json.loads(need(MANIFESTS / manifest, "checkpoint manifests").read_text())
    return keys[key][0]


def test_full_size_matches_official_manifests():
    cfg = get_config("cosyvoice2_0p5b")
    lm, flow, hift = cfg.lm, cfg.flow, cfg.hift
    assert _shape("llm.pt.keys.json", "speech_embedding.weight") == [lm.speech_token_size + 3, lm.hidden_size]
    assert _shape("llm.pt.keys.json", "llm.model.model.layers.0.mlp.gate_proj.weight") == [lm.intermediate_size,
                                                                                           lm.hidden_size]
    head_dim = lm.hidden_size // lm.num_attention_heads
    assert _shape("llm.pt.keys.json", "llm.model.model.layers.0.self_attn.k_proj.weight") == [
        lm.num_key_value_heads * head_dim, lm.hidden_size]
    assert _shape("llm.pt.keys.json", f"llm.model.model.layers.{lm.num_hidden_layers - 1}.mlp.up_proj.weight")
    assert _shape("flow.pt.keys.json", "input_embedding.weight") == [flow.vocab_size, flow.input_size]
    assert _shape("flow.pt.keys.json", "spk_embed_affine_layer.weight") == [flow.n_mels, flow.spk_embed_dim]
    assert _shape("flow.pt.keys.json", "encoder.encoders.0.feed_forward.w_1.weight") == [
        flow.encoder_linear_units, flow.encoder_size]
    assert _shape("flow.pt.keys.json", "encoder.encoders.0.self_attn.pos_bias_u") == [
        flow.encoder_heads, flow.encoder_size // flow.encoder_heads]
    assert _shape("flow.pt.keys.json", f"encoder.encoders.{flow.encoder_blocks - 1}.norm_ff.weight")
    assert _shape("flow.pt.keys.json", f"encoder.up_encoders.{flow.up_encoder_blocks - 1}.norm_ff.weight")
    assert _shape("flow.pt.keys.json", "decoder.estimator.down_blocks.0.1.0.attn1.to_q.weight") == [
        flow.estimator_heads * flow.estimator_attention_head_dim, flow.estimator_channels]
    assert _shape("flow.pt.keys.json", f"decoder.estimator.mid_blocks.{flow.estimator_mid_blocks - 1}.0.res_conv.bias")
    assert _shape("hift.pt.keys.json", "conv_pre.parametrizations.weight.original1") == [hift.base_channels,
                                                                                         cfg.features.n_mels, 7]
    assert _shape("hift.pt.keys.json", "f0_predictor.condnet.0.bias") == [hift.f0_channels]
