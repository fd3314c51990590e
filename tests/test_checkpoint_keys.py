"""Tests for models/checkpoint_keys.py: the DINO -> CAFF-DINO key rules against the reference's mapping file."""
import pytest
import torch

from models.checkpoint_keys import CAFF_ONLY_PREFIXES, caff_keys_for, map_dino_to_caff


@pytest.mark.parametrize('variant', ['4scale_r50', '5scale_swinL'])
def test_rules_reproduce_the_reference_mapping(reference_manifest, variant):
    spec = reference_manifest('dino_to_caff_key_mapping.json')
    entry = spec[variant]
    dino = reference_manifest(entry['dino_manifest'])
    caff = reference_manifest(entry['caff_manifest'])
    ours = {key: caff_keys_for(key) for key in dino}
    assert ours == entry['mapping']
    filled = {k for targets in ours.values() for k in targets}
    assert len(filled) == entry['n_caff_keys_filled_from_dino']
    assert {k for k in caff if k not in filled} == {k for k in caff if k.startswith(CAFF_ONLY_PREFIXES)}


@pytest.mark.parametrize('dino_name,caff_name', [('dino_4scale_r50.json', 'caff_dino_4scale_r50_llvip.json'),
                                                 ('dino_5scale_swinL.json', 'caff_dino_5scale_swinL_llvip.json')])
def test_every_dino_key_lands_in_the_caff_model_with_its_shape(reference_manifest, dino_name, caff_name):
    dino, caff = reference_manifest(dino_name), reference_manifest(caff_name)
    state = {key: torch.empty(shape, device='meta') for key, shape in dino.items()}
    mapped = map_dino_to_caff(state)
    assert set(mapped) <= set(caff)
    assert all(list(mapped[key].shape) == caff[key] for key in mapped)
    assert {key for key in caff if key not in mapped} == {key for key in caff if key.startswith(CAFF_ONLY_PREFIXES)}


def test_backbone_and_input_proj_are_duplicated_and_tensors_shared():
    weight = torch.ones(2)
    mapped = map_dino_to_caff({'backbone.0.body.conv1.weight': weight, 'input_proj.0.0.bias': weight,
                               'transformer.level_embed': weight})
    assert sorted(mapped) == ['backbone_ir.0.body.conv1.weight', 'backbone_visible.0.body.conv1.weight',
                              'input_proj.0.0.bias', 'input_proj_ir.0.0.bias', 'transformer.level_embed']
    assert mapped['backbone_ir.0.body.conv1.weight'] is weight


def test_ddp_prefix_is_removed_and_duplicates_rejected():
    assert caff_keys_for('module.label_enc.weight') == ['label_enc.weight']
    with pytest.raises(ValueError, match='module.label_enc.weight'):
        map_dino_to_caff({'label_enc.weight': torch.ones(1), 'module.label_enc.weight': torch.ones(1)})
