import pytest
import torch

from util.misc import NestedTensor, collate_fn, inverse_sigmoid, nested_tensor_from_tensor_list


def test_nested_tensor_pads_with_zeros_and_masks_padding():
    a = torch.ones(3, 4, 5)
    b = torch.full((3, 6, 2), 2.0)
    nested = nested_tensor_from_tensor_list([a, b])
    tensors, mask = nested.tensors, nested.mask
    assert tensors.shape == (2, 3, 6, 5) and mask.shape == (2, 6, 5) and mask.dtype == torch.bool
    assert torch.equal(tensors[0, :, :4, :5], a) and tensors[0, :, 4:].abs().sum() == 0
    assert torch.equal(tensors[1, :, :6, :2], b) and tensors[1, :, :, 2:].abs().sum() == 0
    assert not mask[0, :4, :5].any() and mask[0, 4:].all()
    assert not mask[1, :, :2].any() and mask[1, :, 2:].all()


def test_nested_tensor_to_moves_both_tensors():
    nested = nested_tensor_from_tensor_list([torch.rand(1, 2, 2)]).to('meta')
    assert nested.tensors.device.type == 'meta' and nested.mask.device.type == 'meta'
    assert NestedTensor(torch.rand(1, 1, 2, 2), None).to('cpu').mask is None


def test_nested_tensor_rejects_mixed_channels():
    with pytest.raises(ValueError, match='image 1'):
        nested_tensor_from_tensor_list([torch.rand(3, 2, 2), torch.rand(1, 2, 2)])


def test_collate_fn_pads_both_modalities_to_one_size_with_one_mask():
    batch = [
        (torch.rand(3, 4, 7), torch.rand(3, 4, 7), {'image_id': 0}),
        (torch.rand(3, 6, 5), torch.rand(3, 6, 5), {'image_id': 1}),
    ]
    rgb, ir, targets = collate_fn(batch)
    assert isinstance(rgb, NestedTensor) and isinstance(ir, NestedTensor)
    assert rgb.tensors.shape == ir.tensors.shape == (2, 3, 6, 7)
    assert ir.mask is rgb.mask
    assert torch.equal(ir.tensors[1, :, :6, :5], batch[1][1])
    assert rgb.mask[0, 4:].all() and not rgb.mask[0, :4].any()
    assert targets == ({'image_id': 0}, {'image_id': 1})


def test_collate_fn_rejects_pair_of_different_sizes():
    with pytest.raises(ValueError, match='sample 0'):
        collate_fn([(torch.rand(3, 4, 4), torch.rand(3, 4, 5), {})])


def test_inverse_sigmoid_inverts_sigmoid_and_stays_finite():
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-6)
    edges = inverse_sigmoid(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(edges).all() and torch.allclose(edges, torch.tensor([-6.9078, 6.9078]), atol=1e-4)
