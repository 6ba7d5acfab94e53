"""Attention masks of the chunk-aware flow: golden official masks and the paper's four masks by construction."""
import pytest
import torch

from minicosy.config import FlowConfig
from minicosy.masks import (CHUNK_2M, CHUNK_M, FULL_CAUSAL, MASK_NAMES, NON_CAUSAL, STATIC_CHUNK_FRAMES,
                            STATIC_CHUNK_TOKENS, add_optional_chunk_mask, batch_chunk_mask, chunk_2m_mask,
                            chunk_m_mask, chunk_size_of, full_causal_mask, make_pad_mask, mask_to_bias,
                            non_causal_mask, sample_training_mask, subsequent_chunk_mask)

from .conftest import GOLDEN, need

# fixture key -> what produces it (fade_in_out belongs to the streaming vocoder cache, not to masks)
NOT_MASKS = {"fade_in_out_example"}


@pytest.fixture(scope="module")
def fx() -> dict:
    return torch.load(need(GOLDEN / "mask_fixtures.pt", "golden mask fixtures"), weights_only=True)


def _golden_checks(fx: dict) -> dict[str, torch.Tensor]:
    lengths, masks_in = fx["make_pad_mask_lengths"], fx["aocm_masks_in"]
    return {
        "make_pad_mask_lengths": torch.tensor([5, 3, 2]),
        "make_pad_mask": make_pad_mask(lengths),
        "make_pad_mask_maxlen7": make_pad_mask(lengths, 7),
        "subsequent_chunk_mask_10_4": subsequent_chunk_mask(10, 4),
        "aocm_masks_in": ~make_pad_mask(torch.tensor([10, 6])).unsqueeze(1),
        "aocm_static4": add_optional_chunk_mask(masks_in, 4),
        "aocm_static0": add_optional_chunk_mask(masks_in, 0),
        "aocm_static4_leftchunks1_ignored": add_optional_chunk_mask(masks_in, 4),
        "mask_to_bias_example": mask_to_bias(fx["aocm_static4"], torch.float32),
        "flow_decoder_chunk_mask_T100_chunk50": add_optional_chunk_mask(
            torch.ones(1, 1, 100, dtype=torch.bool), STATIC_CHUNK_FRAMES),
        "flow_encoder_chunk_mask_T50_chunk25": add_optional_chunk_mask(
            torch.ones(1, 1, 50, dtype=torch.bool), STATIC_CHUNK_TOKENS),
    }


def test_every_golden_mask_is_reproduced_exactly(fx):
    ours = _golden_checks(fx)
    assert set(ours) | NOT_MASKS == set(fx), "a golden mask fixture is not checked"
    for key, value in ours.items():
        assert value.dtype == fx[key].dtype and torch.equal(value, fx[key]), key


def test_static_chunk_sizes_are_the_official_ones():
    cfg = FlowConfig()
    assert (STATIC_CHUNK_TOKENS, STATIC_CHUNK_FRAMES) == (25, 50)
    assert cfg.static_chunk_tokens == STATIC_CHUNK_TOKENS
    assert cfg.static_chunk_tokens * cfg.token_mel_ratio == STATIC_CHUNK_FRAMES


def test_the_four_paper_masks_by_construction():
    size, m = 13, 3
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    assert non_causal_mask(size).all()
    assert torch.equal(full_causal_mask(size), j <= i)                                  # only the past
    assert torch.equal(chunk_m_mask(size, m), j < (i // m + 1) * m)                     # past + own chunk
    assert torch.equal(chunk_2m_mask(size, m), j < (i // (2 * m) + 1) * 2 * m)
    # the future a frame sees: none, up to M-1, up to 2M-1 frames
    future = lambda mask: (mask & (j > i)).sum(1).max().item()
    assert (future(full_causal_mask(size)), future(chunk_m_mask(size, m)), future(chunk_2m_mask(size, m))) == (0, 2, 5)
    # more context is a superset (the "teacher" masks of §2.4)
    assert (full_causal_mask(size) <= chunk_m_mask(size, m)).all()
    assert (chunk_m_mask(size, m) <= chunk_2m_mask(size, m)).all() and (chunk_2m_mask(size, m) <= non_causal_mask(size)).all()
    assert [chunk_size_of(k, m) for k in (NON_CAUSAL, FULL_CAUSAL, CHUNK_M, CHUNK_2M)] == [0, 1, 3, 6]
    with pytest.raises(ValueError, match="mask kind"):
        chunk_size_of(4, m)


def test_batch_chunk_mask_combines_kind_and_padding_per_sample():
    m, size = 2, 9
    lengths = torch.tensor([9, 7, 5, 9])
    pad = ~make_pad_mask(lengths).unsqueeze(1)
    kinds = torch.tensor([NON_CAUSAL, FULL_CAUSAL, CHUNK_M, CHUNK_2M])
    got = batch_chunk_mask(pad, kinds, m)
    paper = [non_causal_mask(size), full_causal_mask(size), chunk_m_mask(size, m), chunk_2m_mask(size, m)]
    for b in range(4):
        assert torch.equal(got[b], paper[b] & pad[b]), MASK_NAMES[b]
    # one kind for the whole batch; chunk-M is exactly the official static chunk mask
    assert torch.equal(batch_chunk_mask(pad, CHUNK_M, m), add_optional_chunk_mask(pad, m))
    assert torch.equal(batch_chunk_mask(pad, NON_CAUSAL, m), pad.expand(4, size, size))
    with pytest.raises(ValueError, match="mask kinds"):
        batch_chunk_mask(pad, torch.tensor([0, 1, 2, 7]), m)


def test_rows_without_any_allowed_key_are_opened_like_the_official_code():
    pad = ~make_pad_mask(torch.tensor([0, 3]), 3).unsqueeze(1)       # an empty sequence
    mask = add_optional_chunk_mask(pad, 2)
    assert mask[0].all() and torch.equal(mask[1], subsequent_chunk_mask(3, 2))
    assert batch_chunk_mask(pad, FULL_CAUSAL, 2)[0].all()


def test_mask_to_bias_and_bad_dtypes():
    mask = torch.tensor([[True, False]])
    assert mask_to_bias(mask, torch.float32).tolist() == [[0.0, -1e10]]
    with pytest.raises(ValueError, match="bool"):
        mask_to_bias(mask.float(), torch.float32)
    with pytest.raises(ValueError, match="bool"):
        add_optional_chunk_mask(mask.float(), 2)


def test_sample_training_mask_is_uniform_and_reproducible():
    kinds = sample_training_mask(8000, generator=torch.Generator().manual_seed(3))
    assert kinds.dtype == torch.int64 and set(kinds.tolist()) == {0, 1, 2, 3}
    counts = torch.bincount(kinds, minlength=4).float() / 8000
    assert (counts - 0.25).abs().max() < 0.03
    again = sample_training_mask(8000, generator=torch.Generator().manual_seed(3))
    other = sample_training_mask(8000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(kinds, again) and not torch.equal(kinds, other)
