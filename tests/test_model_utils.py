import copy
import math

import pytest
import torch
from torch import nn

from models.utils import MLP, DerivedTensors, gen_sineembed_for_position, get_activation_fn, get_clones


def test_mlp_keys_shapes_and_relu_between_layers():
    mlp = MLP(8, 16, 4, 3)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        'layers.0.weight': (16, 8), 'layers.0.bias': (16,),
        'layers.1.weight': (16, 16), 'layers.1.bias': (16,),
        'layers.2.weight': (4, 16), 'layers.2.bias': (4,)}
    x = torch.randn(2, 5, 8)
    expected = mlp.layers[2](torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), expected)


def test_mlp_single_layer_is_linear_without_activation():
    mlp = MLP(3, 99, 2, 1)
    x = torch.randn(4, 3)
    torch.testing.assert_close(mlp(x), mlp.layers[0](x))
    with pytest.raises(ValueError, match='num_layers'):
        MLP(3, 3, 3, 0)


def _naive_sine(value: float, num_feats: int) -> list[float]:
    out = []
    for i in range(num_feats):
        angle = value * 2 * math.pi / 10000 ** (2 * (i // 2) / num_feats)
        out.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
    return out


def test_sineembed_matches_formula_and_dino_order():
    box = torch.tensor([[[0.1, 0.7, 0.3, 0.05]]])  # (1, 1, 4) as (cx, cy, w, h)
    emb = gen_sineembed_for_position(box, num_pos_feats=8)
    assert emb.shape == (1, 1, 32)
    expected = (_naive_sine(0.7, 8) + _naive_sine(0.1, 8) + _naive_sine(0.3, 8) + _naive_sine(0.05, 8))
    torch.testing.assert_close(emb[0, 0], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # the 2-d form is the first half of the 4-d form: [emb(y), emb(x)]
    torch.testing.assert_close(gen_sineembed_for_position(box[..., :2], num_pos_feats=8), emb[..., :16])


def test_sineembed_default_width_is_dino_256_model():
    assert gen_sineembed_for_position(torch.rand(5, 2, 4)).shape == (5, 2, 512)
    with pytest.raises(ValueError, match='last dim'):
        gen_sineembed_for_position(torch.rand(5, 3))


def test_get_clones_makes_independent_copies():
    layer = nn.Linear(2, 2)
    copies = get_clones(layer, 3)
    assert len(copies) == 3 and all(c is not layer for c in copies)
    assert copies[0].weight.data_ptr() != copies[1].weight.data_ptr()
    torch.testing.assert_close(copies[2].weight, layer.weight)


def test_get_activation_fn():
    x = torch.tensor([-1.0, 2.0])
    torch.testing.assert_close(get_activation_fn('relu')(x), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="'swish'"):
        get_activation_fn('swish')


def test_derived_tensors_cache_until_a_source_changes():
    cache = DerivedTensors()
    weight = nn.Parameter(torch.ones(3))
    calls = []

    def build():
        calls.append(1)
        return (weight * 2,)

    (first,) = cache.get('w', [weight], build)  # autograd on and the source requires grad: built, not cached
    assert first.requires_grad and len(cache) == 0
    with torch.no_grad():
        (a,) = cache.get('w', [weight], build)
        (b,) = cache.get('w', [weight], build)
        assert a is b and len(calls) == 2 and not a.requires_grad
        weight.add_(1.0)  # in-place update (optimiser step, load_state_dict)
        (c,) = cache.get('w', [weight], build)
    assert torch.equal(c, torch.full((3,), 4.0)) and len(calls) == 3
    with torch.inference_mode():
        (d,) = cache.get('w', [weight], build)
    assert d is c and not d.is_inference()
    assert len(copy.deepcopy(cache)) == 0


def test_nothing_built_from_fake_tensors_is_cached():
    """What a tracer computes is fake; cached, it would break the next eager call (the ONNX parity check)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    cache, weight = DerivedTensors(), torch.randn(3)
    pos = torch.rand(2, 5, 4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        fake_weight, fake_pos = mode.from_tensor(weight), mode.from_tensor(pos)
        assert isinstance(cache.get('w', [fake_weight], lambda: (fake_weight * 2,))[0], FakeTensor)
        assert len(cache) == 0
        gen_sineembed_for_position(fake_pos, 18)  # a width no other test uses: its frequencies are not cached yet
    eager = gen_sineembed_for_position(pos, 18)
    assert not isinstance(eager, FakeTensor) and torch.isfinite(eager).all()
    with torch.no_grad():
        assert torch.equal(cache.get('w', [weight], lambda: (weight * 2,))[0], weight * 2) and len(cache) == 1
