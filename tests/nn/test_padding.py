"""fastbert.nn.padding: pack a padded batch into its real tokens and back."""
import pytest
import torch

from fastbert.nn import padding


def test_pack_unpack_round_trip_and_plan():
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    h = torch.randn(4, 4, 5, requires_grad=True)
    plan = padding.plan(valid)
    assert plan.total == 8 and plan.max_seqlen == 4 and plan.has_padding
    assert plan.cu_seqlens.dtype == torch.int32 and plan.cu_seqlens.tolist() == [0, 3, 4, 4, 8]
    x = padding.pack(h, plan)
    assert x.shape == (8, 5)
    torch.testing.assert_close(x, h[valid], rtol=0, atol=0)
    back = padding.unpack(x, plan)
    assert back.shape == h.shape
    torch.testing.assert_close(back[valid], h[valid], rtol=0, atol=0)
    assert (back[~valid] == 0).all()
    back.sum().backward()  # the gradient reaches the real tokens only
    assert torch.equal(h.grad, valid[..., None].expand_as(h).float())


def test_no_padding_and_empty_batch():
    plan = padding.plan(torch.ones(2, 3, dtype=torch.bool))
    assert not plan.has_padding and plan.total == 6
    empty = padding.plan(torch.ones(0, 3, dtype=torch.bool))
    assert empty.total == 0 and padding.pack(torch.randn(0, 3, 2), empty).shape == (0, 2)
    assert padding.unpack(torch.randn(0, 2), empty).shape == (0, 3, 2)


def test_bad_mask_names_the_argument():
    with pytest.raises(ValueError, match="valid must be a bool"):
        padding.plan(torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid must be a bool"):
        padding.plan(torch.ones(3, dtype=torch.bool))
