"""State-dict key rules: the mapping from a mono-spectral DINO checkpoint to CAFF-DINO (``--pretrain_model_coco``),
and telling the two kinds of checkpoint apart by their keys.

Follows CAFF-DETR ``main.py`` (``--pretrain_model_coco``) and docs/REFERENCE.md §3, written as a declarative rule table
instead of inline string tests. The first rule whose prefix matches a source key decides its CAFF names:

=====================  ==========================================  ==========================================
DINO key               CAFF keys                                   why
=====================  ==========================================  ==========================================
``backbone.<rest>``    ``backbone_visible.<rest>``,                both streams start from the COCO backbone
                       ``backbone_ir.<rest>``                      (the DINO name itself is not kept)
``input_proj.<rest>``  ``input_proj.<rest>``,                      both projections start from DINO's
                       ``input_proj_ir.<rest>``
anything else          the same key                                transformer, label_enc, heads (incl. the
                                                                   shared-head aliases)
=====================  ==========================================  ==========================================

``conv_corr.*`` and ``redim_corr.*`` have no DINO source and keep their initialisation. The mapping does not
know the target model: the loader keeps the mapped keys that exist in the model with equal shapes (the reference
checks no shapes) and reports the rest. Differs from the reference in that a DDP ``module.`` prefix on the source
keys is removed first (the reference's matching broke on it).

``checkpoint_kind(state_dict)``: ``'caff'`` when a key belongs to a part only CAFF-DINO has (the second stream
``backbone_ir`` / ``input_proj_ir``, or the fusion), ``'dino'`` when the backbone is the single ``backbone.*``,
``'unknown'`` otherwise. The loaders use it to explain a checkpoint passed to the wrong flag.
"""
import torch

# (source prefix, target prefixes), first match wins; keys matching no rule keep their name.
DINO_TO_CAFF_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('backbone.', ('backbone_visible.', 'backbone_ir.')),
    ('input_proj.', ('input_proj.', 'input_proj_ir.')),
)

# CAFF-only parameters that no DINO key feeds.
CAFF_ONLY_PREFIXES = ('conv_corr.', 'redim_corr.')

# Keys that only a two-stream CAFF-DINO state dict has, and the one backbone prefix of a mono-spectral DINO.
CAFF_STREAM_PREFIXES = ('backbone_visible.', 'backbone_ir.', 'input_proj_ir.') + CAFF_ONLY_PREFIXES
DINO_BACKBONE_PREFIX = 'backbone.'

_DDP_PREFIX = 'module.'


def caff_keys_for(dino_key: str) -> list[str]:
    """The CAFF-DINO key(s) that the DINO state-dict key ``dino_key`` initialises."""
    if dino_key.startswith(_DDP_PREFIX):
        dino_key = dino_key[len(_DDP_PREFIX):]
    for source, targets in DINO_TO_CAFF_RULES:
        if dino_key.startswith(source):
            rest = dino_key[len(source):]
            return [target + rest for target in targets]
    return [dino_key]


def map_dino_to_caff(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CAFF-DINO-named state dict from a DINO one; tensors are shared, not copied.

    Raises ValueError naming the keys if two source keys map to one target (e.g. a state dict holding both
    ``backbone.x`` and ``module.backbone.x``).
    """
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for dino_key, value in state_dict.items():
        for caff_key in caff_keys_for(dino_key):
            if caff_key in mapped:
                raise ValueError(f'map_dino_to_caff: keys {sources[caff_key]!r} and {dino_key!r} both map to '
                                 f'{caff_key!r}; pass a state dict with one copy of each parameter')
            mapped[caff_key] = value
            sources[caff_key] = dino_key
    return mapped


def checkpoint_kind(state_dict: dict) -> str:
    """``'caff'``, ``'dino'`` or ``'unknown'``: which model wrote ``state_dict`` (a ``module.`` prefix is ignored)."""
    keys = [k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k for k in state_dict]
    if any(k.startswith(CAFF_STREAM_PREFIXES) for k in keys):
        return 'caff'
    if any(k.startswith(DINO_BACKBONE_PREFIX) for k in keys):
        return 'dino'
    return 'unknown'
