"""PositionEmbeddingSineHW against an element-by-element evaluation of DINO's formula."""
import math

import numpy as np
import pytest
import torch

from models.position_encoding import PositionEmbeddingSineHW
from util.misc import NestedTensor


def _padded_mask(sizes, height, width):
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    return mask


def _reference_value(coord, extent, k, num_feats, temperature):
    """Channel k of the encoding of the 1-based pixel position `coord` in an image `extent` pixels long."""
    angle = coord / (extent + 1e-6) * 2 * math.pi / temperature ** (2 * (k // 2) / num_feats)
    return math.sin(angle) if k % 2 == 0 else math.cos(angle)


def test_matches_formula_on_padded_batch():
    num_feats, temp_h, temp_w = 8, 20, 7
    sizes = [(5, 7), (3, 4)]
    mask = _padded_mask(sizes, 5, 7)
    pe = PositionEmbeddingSineHW(num_feats, pe_temperatureH=temp_h, pe_temperatureW=temp_w, normalize=True)
    pos = pe(NestedTensor(torch.zeros(2, 3, 5, 7), mask)).numpy()
    assert pos.shape == (2, 2 * num_feats, 5, 7)
    assert pos.dtype == np.float32
    expected = np.zeros_like(pos, dtype=np.float64)
    for b, (h, w) in enumerate(sizes):
        for i in range(h):
            for j in range(w):
                for k in range(num_feats):
                    expected[b, k, i, j] = _reference_value(i + 1, h, k, num_feats, temp_h)
                    expected[b, num_feats + k, i, j] = _reference_value(j + 1, w, k, num_feats, temp_w)
        np.testing.assert_allclose(pos[b, :, :h, :w], expected[b, :, :h, :w], atol=1e-5)


def test_padding_values():
    num_feats = 4
    mask = _padded_mask([(2, 3)], 4, 5)
    pos = PositionEmbeddingSineHW(num_feats)(NestedTensor(torch.zeros(1, 1, 4, 5), mask))[0]
    # Padded rows under image columns keep the last image row's y; fully padded columns have y = 0.
    torch.testing.assert_close(pos[:num_feats, 3, :3], pos[:num_feats, 1, :3])
    zero_angle = torch.tensor([0.0, 1.0] * (num_feats // 2))
    torch.testing.assert_close(pos[:num_feats, 2, 4], zero_angle)
    torch.testing.assert_close(pos[num_feats:, 3, 4], zero_angle)


def test_unpadded_image_is_batch_independent_and_has_no_parameters():
    pe = PositionEmbeddingSineHW(16)
    assert len(list(pe.parameters())) == 0 and len(list(pe.buffers())) == 0
    mask = _padded_mask([(6, 9), (6, 9)], 6, 9)
    pos = pe(NestedTensor(torch.zeros(2, 3, 6, 9), mask))
    torch.testing.assert_close(pos[0], pos[1])
    # Rows vary only in the y half, columns only in the x half.
    assert torch.all(pos[0, :16, :, :1] == pos[0, :16, :, 1:2])
    assert torch.all(pos[0, 16:, :1, :] == pos[0, 16:, 1:2, :])


def test_rejects_scale_without_normalize_and_missing_mask():
    with pytest.raises(ValueError, match='normalize'):
        PositionEmbeddingSineHW(8, normalize=False, scale=1.0)
    with pytest.raises(ValueError, match='mask'):
        PositionEmbeddingSineHW(8)(NestedTensor(torch.zeros(1, 3, 4, 4), None))
