"""Loading never runs code: checkpoints load with ``weights_only=True`` and a pickled payload is
refused with a clear error before anything in it executes (issue: loading that fails safely)."""
import pytest
import torch

from minicosy.campplus import CAMPPlus, load_speaker_table
from minicosy.flow import CausalMaskedDiffWithXvec
from minicosy.hift import HiFTGenerator
from minicosy.lm import TextSpeechLM
from minicosy.speech_tokenizer import SpeechTokenizer
from minicosy.train import load_checkpoint, load_state_dict_checked

from .conftest import ROOT

CKPT = ROOT / "data" / "checkpoints"
SHIPPED = {"lm_tiny.pt": TextSpeechLM, "flow_tiny.pt": CausalMaskedDiffWithXvec, "hift_tiny.pt": HiFTGenerator,
           "campplus_tiny.pt": CAMPPlus, "speech_tokenizer_fsq.pt": SpeechTokenizer, "lm_phone.pt": TextSpeechLM,
           "flow_phone.pt": CausalMaskedDiffWithXvec, "speech_tokenizer_fsq729.pt": SpeechTokenizer,
           "hift_phone.pt": HiFTGenerator}


class Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_shipped_checkpoints_hold_only_tensors_and_plain_types():
    for name in [*SHIPPED, "speech_tokenizer_vq.pt", "spk2info_tiny.pt"]:
        torch.load(CKPT / name, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "payload-ran"
    ckpt = torch.load(CKPT / name, map_location="cpu", weights_only=True)
    ckpt["extra"] = Payload(str(marker))
    path = tmp_path / name
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=f"{name}.*refused"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="refused"):
        SHIPPED[name].from_checkpoint(path)
    assert not marker.exists(), "the payload ran"
    # the same file without the payload loads and gives the shipped weights
    del ckpt["extra"]
    torch.save(ckpt, path)
    assert load_checkpoint(path)["state_dict"].keys() == load_checkpoint(CKPT / name)["state_dict"].keys()


def test_non_finite_weights_are_refused_naming_file_and_key(tmp_path):
    ckpt = torch.load(CKPT / "flow_tiny.pt", map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key][0] = float("nan")
    torch.save(ckpt, tmp_path / "flow.pt")
    with pytest.raises(ValueError, match=f"flow.pt: {key} holds NaN or Inf"):
        CausalMaskedDiffWithXvec.from_checkpoint(tmp_path / "flow.pt")
    hift = HiFTGenerator.from_checkpoint(CKPT / "hift_tiny.pt")
    state = {k: v.clone() for k, v in hift.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=f"{key} holds NaN or Inf"):
        load_state_dict_checked(hift, state, "hift.pt")


def test_speaker_tables_are_checked(tmp_path):
    table = load_speaker_table(CKPT / "spk2info_tiny.pt")
    speaker = next(iter(table))
    table[speaker]["embedding"][..., 0] = float("nan")
    torch.save(table, tmp_path / "spk2info.pt")
    with pytest.raises(ValueError, match=f"spk2info.pt: {speaker}.embedding holds NaN"):
        load_speaker_table(tmp_path / "spk2info.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a speaker table"):
        load_speaker_table(tmp_path / "list.pt")


@pytest.mark.parametrize("content, match", [
    (b"", "empty, truncated or another format"),
    (b"hello world", "not a readable torch file"),
    ("half", "empty, truncated or another format"),
])
def test_damaged_files_get_an_error_naming_them(tmp_path, content, match):
    path = tmp_path / "flow_tiny.pt"
    path.write_bytes((CKPT / "flow_tiny.pt").read_bytes()[:100_000] if content == "half" else content)
    with pytest.raises(ValueError, match=match) as error:
        CausalMaskedDiffWithXvec.from_checkpoint(path)
    assert str(path) in str(error.value) and "weights_only=False" not in str(error.value)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                     .numpy().tobytes())
    with pytest.raises(ValueError, match="random.pt is not a readable torch file"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_checkpoint_of_another_model_is_named(tmp_path, name):
    """Every model's from_checkpoint names the file when the checkpoint is another model's (its
    model_config does not describe it, or its weights do not fit)."""
    other = "hift_tiny.pt" if SHIPPED[name] is not HiFTGenerator else "campplus_tiny.pt"
    with pytest.raises(ValueError, match=other):
        SHIPPED[name].from_checkpoint(CKPT / other)
    ckpt = torch.load(CKPT / name, map_location="cpu", weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, tmp_path / name)
    with pytest.raises(ValueError, match=f"(?s){name} does not fit .*missing keys"):
        SHIPPED[name].from_checkpoint(tmp_path / name)


def test_a_broken_onnx_file_is_named(tmp_path):
    from minicosy.campplus import CAMPPlusONNX
    from minicosy.speech_tokenizer import OnnxSpeechTokenizer

    broken = tmp_path / "campplus.onnx"
    broken.write_bytes(b"\x08\x07not a model")
    with pytest.raises(ValueError, match="campplus.onnx is not a readable ONNX model"):
        CAMPPlusONNX(broken)
    with pytest.raises(ValueError, match="speech tokenizer ONNX file .*campplus.onnx is not a readable ONNX model"):
        OnnxSpeechTokenizer(broken)


def test_a_yaml_field_of_the_wrong_kind_is_named(tmp_path):
    from minicosy.official import config_from_yaml, write_official_folder
    from minicosy.pipeline import TINY_DIR, CosyVoice2

    folder = write_official_folder(CosyVoice2.from_pretrained("tiny"), tmp_path / "f", TINY_DIR / "text_tokenizer")
    text = (folder / "cosyvoice2.yaml").read_text()
    assert config_from_yaml(folder / "cosyvoice2.yaml").flow.estimator_n_blocks == 1
    (folder / "cosyvoice2.yaml").write_text(text.replace("n_blocks: 1", "n_blocks: many"))
    with pytest.raises(ValueError, match="cosyvoice2.yaml: flow.estimator_n_blocks must be a number, got 'many'"):
        CosyVoice2.from_pretrained(folder)
    (folder / "cosyvoice2.yaml").write_text(text.replace("sigma_min: 1e-06", "sigma_min: small"))
    with pytest.raises(ValueError, match="cosyvoice2.yaml: a hyperparameter has the wrong type"):
        config_from_yaml(folder / "cosyvoice2.yaml")



@pytest.mark.parametrize("preset", ["tiny", "cosyvoice2_0p5b"])
def test_the_written_yaml_gives_back_every_size(tmp_path, preset):
    """``yaml_text`` carries every size minicosy reads, the chunk size too (its own top-level key,
    as in the official recipe: not the token rate, which equals it only at 25)."""
    import dataclasses

    from minicosy.config import get_config
    from minicosy.official import config_from_yaml, yaml_text

    cfg = get_config(preset)
    cfg.flow = dataclasses.replace(cfg.flow, static_chunk_tokens=5)
    (tmp_path / "cosyvoice2.yaml").write_text(yaml_text(cfg))
    back = config_from_yaml(tmp_path / "cosyvoice2.yaml")
    assert back.flow == cfg.flow and back.hift == cfg.hift

def test_an_invalid_qwen_config_json_is_named(tmp_path):
    from minicosy.lm import lm_config_from_qwen_folder

    for bad, match in [("{oops", "not valid JSON"), ("[1]", "JSON object"),
                       ('{"model_type": "qwen2", "tie_word_embeddings": true, "hidden_size": "big"}', "hidden_size")]:
        (tmp_path / "config.json").write_text(bad)
        with pytest.raises(ValueError, match=f"config.json.*{match}"):
            lm_config_from_qwen_folder(tmp_path)
