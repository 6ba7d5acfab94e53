"""FSQ (eqs. 1, 2, 14) and the VQ baseline."""
import torch

from minicosy.fsq import FSQ, VectorQuantizer, bounded_round, codes_to_digits, digits_to_codes


def test_index_digit_round_trip_for_all_6561_codes():
    codes = torch.arange(3 ** 8)
    digits = codes_to_digits(codes, levels=1, dim=8)
    assert digits.min() == -1 and digits.max() == 1
    assert torch.equal(digits_to_codes(digits, levels=1), codes)
    assert len({tuple(d.tolist()) for d in digits}) == 3 ** 8      # a bijection


def test_other_levels_round_trip():
    codes = torch.arange(5 ** 4)
    assert torch.equal(digits_to_codes(codes_to_digits(codes, 2, 4), 2), codes)


def test_bounded_round_range_and_straight_through_gradient():
    x = torch.linspace(-4, 4, 101, requires_grad=True)
    y = bounded_round(x, levels=1)
    assert set(y.detach().unique().tolist()) == {-1.0, 0.0, 1.0}
    y.sum().backward()
    assert (x.grad > 0).all()                                      # the gradient of K·tanh passes through


def test_fsq_forward_decode_and_gradients():
    torch.manual_seed(0)
    fsq = FSQ(dim=16, levels=1, code_dim=8)
    h = torch.randn(2, 7, 16, requires_grad=True)
    h_hat, codes, aux = fsq(h)
    assert h_hat.shape == h.shape and codes.shape == (2, 7) and aux.item() == 0
    assert codes.min() >= 0 and codes.max() < 6561
    torch.testing.assert_close(fsq.decode(codes), h_hat)          # tokens alone rebuild Ĥ (eq. 14-15)
    h_hat.pow(2).sum().backward()
    assert h.grad.abs().sum() > 0 and fsq.proj_down.weight.grad.abs().sum() > 0
    one_hot = torch.nn.functional.one_hot(codes, 6561).float()
    torch.testing.assert_close(fsq.decode_soft(one_hot), h_hat)


def test_vq_baseline():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=16, codebook_size=64, code_dim=4)
    h = torch.randn(3, 5, 16, requires_grad=True)
    h_hat, codes, loss = vq(h)
    assert codes.shape == (3, 5) and codes.max() < 64 and loss > 0
    torch.testing.assert_close(vq.decode(codes), h_hat)
    (h_hat.sum() + loss).backward()
    assert h.grad.abs().sum() > 0 and vq.codebook.weight.grad.abs().sum() > 0
