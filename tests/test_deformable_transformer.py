import copy
import math

import pytest
import torch
from torch import nn

from models.deformable_transformer import (DeformableTransformer, DeformableTransformerEncoder,
                                           encoder_output_proposals, valid_ratios_from_mask)
from models.dn_components import prepare_for_cdn
from models.ops import MSDeformAttn
from models.utils import MLP


def attach_dino_heads(transformer: DeformableTransformer, num_classes: int) -> nn.Module:
    """Heads as DINO's detector builds and attaches them (shared per-layer heads, deep-copied two-stage heads)."""
    d = transformer.d_model
    class_embed = nn.Linear(d, num_classes)
    bbox_embed = MLP(d, d, 4, 3)
    detector = nn.Module()
    detector.bbox_embed = nn.ModuleList([bbox_embed] * transformer.num_decoder_layers)
    detector.class_embed = nn.ModuleList([class_embed] * transformer.num_decoder_layers)
    transformer.decoder.bbox_embed = detector.bbox_embed
    transformer.decoder.class_embed = detector.class_embed
    transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
    transformer.enc_out_class_embed = copy.deepcopy(class_embed)
    return detector


def tiny_transformer(num_queries=10, **kwargs) -> DeformableTransformer:
    torch.manual_seed(0)
    options = dict(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                   num_feature_levels=2, num_queries=num_queries, msda_backend='pytorch')  # no kernel build
    options.update(kwargs)
    transformer = DeformableTransformer(**options)
    attach_dino_heads(transformer, num_classes=5)
    return transformer.eval()


def tiny_inputs(batch=2, d=32, shapes=((8, 8), (4, 4))):
    torch.manual_seed(1)
    srcs = [torch.randn(batch, d, h, w) for h, w in shapes]
    pos = [torch.randn(batch, d, h, w) for h, w in shapes]
    masks = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in shapes]
    # image 1 is 3/4 as wide as the padded batch on every level
    for mask, (h, w) in zip(masks, shapes):
        mask[1, :, (3 * w) // 4:] = True
    return srcs, masks, pos


@pytest.mark.parametrize('manifest, levels', [('dino_4scale_r50.json', 4), ('dino_5scale_swinL.json', 5)])
def test_state_dict_matches_reference_manifest(reference_manifest, manifest, levels):
    expected = list(reference_manifest(manifest, 'transformer.').items())
    with torch.device('meta'):
        transformer = DeformableTransformer(num_feature_levels=levels)
        attach_dino_heads(transformer, num_classes=91)
    got = [(k, list(v.shape)) for k, v in transformer.state_dict(keep_vars=True).items()]
    assert got == expected
    # parameter total of the reference transformer with its heads (docs/REFERENCE.md §10), shared heads counted once
    assert sum(p.numel() for p in transformer.parameters()) == {4: 17_775_550, 5: 18_071_870}[levels]


def test_msda_backend_reaches_every_layer():
    transformer = tiny_transformer(msda_backend='triton', num_encoder_layers=2)
    layers = [m for m in transformer.modules() if isinstance(m, MSDeformAttn)]
    assert len(layers) == 4 and {layer.backend for layer in layers} == {'triton'}
    with pytest.raises(ValueError, match="MSDeformAttn: unknown MSDeformAttn backend 'gpu'"):
        tiny_transformer(msda_backend='gpu')


def test_initialisation_follows_dino():
    torch.manual_seed(0)
    transformer = DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                        dim_feedforward=64, num_feature_levels=2, num_queries=10,
                                        msda_backend='pytorch')
    attn = transformer.encoder.layers[0].self_attn
    # MSDeformAttn's own init runs after the blanket xavier init
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    assert attn.sampling_offsets.bias.abs().sum() > 0
    # tgt_embed ends xavier-uniform (DINO's normal draw is overwritten): bounded by sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (10 + 32))
    assert transformer.tgt_embed.weight.abs().max() <= bound
    # level_embed is normal, so it exceeds its xavier bound sqrt(6 / 34) somewhere with near certainty
    assert transformer.level_embed.abs().max() > math.sqrt(6 / 34)


def test_forward_shapes_and_backward():
    transformer = tiny_transformer().train()
    srcs, masks, pos = tiny_inputs()
    for s in srcs:
        s.requires_grad_(True)
    hs, references, hs_enc, ref_enc, init_box = transformer(srcs, masks, pos)
    assert hs.shape == (2, 2, 10, 32)
    assert references.shape == (3, 2, 10, 4)
    assert hs_enc.shape == (1, 2, 10, 32) and ref_enc.shape == (1, 2, 10, 4) and init_box.shape == (2, 10, 4)
    assert ((references >= 0) & (references <= 1)).all() and ((init_box > 0) & (init_box < 1)).all()
    # the decoder's input anchors are the detached encoder boxes; the refined ones keep their graph
    enc_box_weight = transformer.enc_out_bbox_embed.layers[0].weight
    assert torch.autograd.grad(references.sum(), enc_box_weight, retain_graph=True, allow_unused=True)[0] is None
    assert references[1:].requires_grad
    torch.testing.assert_close(references[0], ref_enc[0])
    (hs.sum() + references.sum() + hs_enc.sum() + ref_enc.sum()).backward()
    # zero at DINO's init (sampling_offsets / attention_weights start with zero weights), but connected
    assert transformer.level_embed.grad is not None
    for name in ['tgt_embed.weight', 'enc_output.weight', 'enc_out_bbox_embed.layers.0.weight',
                 'decoder.ref_point_head.layers.0.weight', 'encoder.layers.0.self_attn.value_proj.weight',
                 'decoder.layers.1.cross_attn.sampling_offsets.weight']:
        grad = dict(transformer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert srcs[1].grad.abs().sum() > 0


def test_dn_queries_prepended_and_masked_from_matching_queries():
    transformer = tiny_transformer()
    srcs, masks, pos = tiny_inputs()
    plain = transformer(srcs, masks, pos)
    num_dn, num_queries = 6, 10
    attn_mask = torch.zeros(num_dn + num_queries, num_dn + num_queries, dtype=torch.bool)
    attn_mask[num_dn:, :num_dn] = True
    dn_boxes, dn_labels = torch.randn(2, num_dn, 4), torch.randn(2, num_dn, 32)
    hs, references, hs_enc, _, _ = transformer(srcs, masks, pos, dn_boxes, dn_labels, attn_mask)
    assert hs.shape == (2, 2, 16, 32) and references.shape == (3, 2, 16, 4)
    torch.testing.assert_close(references[0, :, :num_dn], dn_boxes.sigmoid())
    # matching queries cannot see the DN queries, so their outputs are those of the run without DN
    torch.testing.assert_close(hs[:, :, num_dn:], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(references[:, :, num_dn:], plain[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs_enc, plain[2])


def test_padded_pixels_do_not_change_any_output():
    transformer = tiny_transformer()
    srcs, masks, pos = tiny_inputs()
    before = transformer(srcs, masks, pos)
    noisy_srcs = [s.masked_fill(m[:, None], 0.0) + 50 * torch.randn_like(s) * m[:, None] for s, m in zip(srcs, masks)]
    noisy_pos = [p + 50 * torch.randn_like(p) * m[:, None] for p, m in zip(pos, masks)]
    after = transformer(noisy_srcs, masks, noisy_pos)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_encoder_output_proposals_values_and_invalid_tokens():
    memory = torch.ones(1, 4 * 4 + 2 * 2, 3)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, 2:] = True  # the image covers the left half of the padded map
    padding_mask = torch.cat([mask.flatten(1), mask[:, ::2, ::2].flatten(1)], 1)
    out_memory, proposals = encoder_output_proposals(memory, padding_mask, [(4, 4), (2, 2)], default_hw=0.1)
    boxes = proposals.sigmoid()[0]
    # level 0, pixel (row 1, col 0): centre ((0 + .5) / 2 valid columns, (1 + .5) / 4 rows), side 0.1
    torch.testing.assert_close(boxes[4], torch.tensor([0.25, 0.375, 0.1, 0.1]))
    # level 1, pixel (row 1, col 0): 1 valid column of 2 rows, side 0.2
    torch.testing.assert_close(boxes[16 + 2], torch.tensor([0.5, 0.75, 0.2, 0.2]))
    invalid = torch.isinf(proposals[0]).all(-1)
    assert torch.equal(invalid, padding_mask[0])
    assert (out_memory[0, invalid] == 0).all() and (out_memory[0, ~invalid] == 1).all()


def test_encoder_reference_points_are_pixel_centres_scaled_by_valid_ratio():
    valid_ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 1.0], [0.5, 1.0]]])
    points = DeformableTransformerEncoder.reference_points([(2, 4), (1, 2)], valid_ratios)
    assert points.shape == (2, 8 + 2, 2, 2)
    torch.testing.assert_close(points[0, 1, 0], torch.tensor([0.375, 0.25]))
    # with half the width valid, level-1 pixel 0 maps to x = (0.5 / 1) of the valid part on each level
    torch.testing.assert_close(points[1, 8, :, 0], torch.tensor([0.25, 0.25]))
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 1:] = True  # image 1 is 2 rows x 1 column of the 3 x 4 padded map
    torch.testing.assert_close(valid_ratios_from_mask(mask), torch.tensor([[1.0, 1.0], [0.25, 2 / 3]]))


def test_clear_errors():
    transformer = tiny_transformer(num_queries=200)
    srcs, masks, pos = tiny_inputs()
    with pytest.raises(ValueError, match='num_queries=200'):
        transformer(srcs, masks, pos)
    with pytest.raises(ValueError, match='expected 2 levels'):
        transformer(srcs[:1], masks[:1], pos[:1])
    bare = DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=64, num_feature_levels=2, num_queries=10, msda_backend='pytorch')
    with pytest.raises(RuntimeError, match='enc_out_class_embed'):
        bare(srcs, masks, pos)


def test_cdn_groups_are_independent_inside_the_decoder():
    transformer = tiny_transformer()
    srcs, masks, pos = tiny_inputs()
    targets = [{'labels': torch.tensor([1, 2]), 'boxes': torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {'labels': torch.tensor([0]), 'boxes': torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    label_enc = nn.Embedding(6, 32)
    dn_label, dn_bbox, attn_mask, meta = prepare_for_cdn((targets, 2, 0.5, 0.4), 10, 5, 32, label_enc)
    group_size = meta['pad_size'] // meta['num_dn_group']
    hs = transformer(srcs, masks, pos, dn_bbox, dn_label, attn_mask)[0]
    # replace group 1 entirely: group 0 and the matching queries must not notice
    dn_label2, dn_bbox2 = dn_label.clone(), dn_bbox.clone()
    dn_label2[:, group_size:2 * group_size] = torch.randn(2, group_size, 32)
    dn_bbox2[:, group_size:2 * group_size] = torch.randn(2, group_size, 4)
    hs2 = transformer(srcs, masks, pos, dn_bbox2, dn_label2, attn_mask)[0]
    keep = torch.ones(hs.shape[2], dtype=torch.bool)
    keep[group_size:2 * group_size] = False
    torch.testing.assert_close(hs[:, :, keep], hs2[:, :, keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hs[:, :, ~keep], hs2[:, :, ~keep])
