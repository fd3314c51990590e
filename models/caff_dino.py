"""CAFF-DINO: DINO with one backbone per spectrum and CAFF fusion of the two streams at every feature level.

Follows ``DINO`` of CAFF-DETR (``CAFF-DINO/models/dino/dino.py``; docs/REFERENCE.md §0-2), itself IDEA-Research/DINO's
``DINO`` with a second backbone. With the default arguments it computes what the reference computes, so released
DINO / CAFF-DINO weights load by name (parameter names and state-dict order are the reference's) and give the
reference's outputs. The data flow::

    query image  -> backbone_visible -> input_proj    -> srcs_q,  masks_q, pos  --+
                                                                                  +-> fusion per level
    key/value img -> backbone_ir     -> input_proj_ir -> srcs_kv, masks_kv -------+   (conv_corr, redim_corr)
      -> DeformableTransformer(srcs, masks_q | masks_kv, pos, DN queries)
      -> shared class_embed / bbox_embed on every decoder layer (iterative refinement) -> outputs

Modality routing (docs/REFERENCE.md §0). The reference's data pipeline swaps its images, so in every released
checkpoint the *thermal* image runs through ``backbone_visible``/``input_proj``, is CAFF's query side and supplies
the transformer's position encodings, while the *RGB* image runs through ``backbone_ir``/``input_proj_ir`` and is
the key/value side. The parameter names ``*_visible``/``*_ir`` are kept so weights load; what they see is set by
``query_modality``: ``'ir'`` (default, the reference) or ``'rgb'`` (the naming taken literally). Callers always pass
the images by name: ``forward(samples_rgb, samples_ir)``.

Differences from the reference, none of which changes its outputs where it runs:

- fusion is chosen by ``fusion_type`` (``models/fusion.py::build_fusion``, the one place that reads it): ``caff``
  (the reference), ``caff_dw`` (CAFF with depthwise-separable branch convs), ``concat``, ``add``, ``rgb_only``,
  ``ir_only``. The single-stream types run only the stream they keep; the unused backbone and projection are
  frozen at build so optimiser and DDP skip them (their weights still load);
- the key/value stream's position encodings are not computed (the reference computes and discards them);
- a second extra level of the key/value stream uses ``input_proj_ir`` (the reference reused ``input_proj``;
  unreachable in its configs, which have one extra level);
- denoising queries are built only in training with targets (the reference calls ``prepare_for_cdn`` always and
  it returns nothing outside training), device from the inputs (no ``.cuda()``);
- ``freeze_backbones`` freezes both backbones once at build (the reference does it in every training epoch);
  as in the reference the frozen backbones follow the model's train/eval mode, so Swin's DropPath stays active
  in training;
- the ``enc_outputs`` list of DINO (only for more than one encoder output, never with two-stage 'standard') is
  not produced; ``hs[0] + 0 * label_enc.weight[0, 0]`` (which keeps ``label_enc`` in the graph when no DN
  queries exist) is done out of place.

Initialisation as the reference: xavier on ``input_proj[*][0]`` (zero bias), focal-prior bias on the class heads,
zero last layer of the box heads; ``input_proj_ir``, ``conv_corr`` and ``redim_corr`` keep PyTorch's defaults.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from util.errors import InputSizeError
from util.misc import NestedTensor, inverse_sigmoid, nested_tensor_from_tensor_list

from .backbones import freeze_module
from .dn_components import check_dn_labelbook, dn_post_process, prepare_for_cdn
from .fusion import build_fusion
from .utils import MLP

QUERY_MODALITIES = ('ir', 'rgb')
CLASS_PRIOR_PROB = 0.01  # focal-loss prior of the class heads' bias (RetinaNet, as DINO)


def build_input_projections(num_channels: list[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
    """Per level ``Sequential(conv, GroupNorm(32, hidden_dim))``: 1x1 on each backbone output, then for each extra
    level a 3x3 stride-2 conv (input: the raw last backbone map for the first extra level, the previous
    projected level after that)."""
    projections = []
    for channels in num_channels:
        projections.append(nn.Sequential(nn.Conv2d(channels, hidden_dim, 1), nn.GroupNorm(32, hidden_dim)))
    in_channels = num_channels[-1]
    for _ in range(num_levels - len(num_channels)):
        projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1),
                                         nn.GroupNorm(32, hidden_dim)))
        in_channels = hidden_dim
    return nn.ModuleList(projections)


def _project(projection: nn.Sequential, x: torch.Tensor, samples: NestedTensor, stride: int) -> torch.Tensor:
    """One level's ``Sequential(conv, GroupNorm)`` of :func:`build_input_projections`, with a clear error for the
    input size at which torch's GroupNorm refuses to run.

    torch rejects a GroupNorm whose groups hold a single value over the whole batch (``B * C / 32 * H_l * W_l ==
    1``): batch size 1, ``hidden_dim`` 32 and a 1x1 map, i.e. an image of at most ``stride`` px on both sides at
    that level (the stride-64 extra level for images up to 64x64). The reference has the same GroupNorm(32,
    hidden_dim) (it uses hidden_dim 256, 8 values per group even on a 1x1 map), so this is its semantics, not a bug
    to work around: the error names the sizes that run.
    """
    conv, norm = projection
    height, width = ((size + 2 * pad - dilation * (kernel - 1) - 1) // step + 1 for size, pad, dilation, kernel, step
                     in zip(x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))
    batch, channels = x.shape[0], conv.out_channels
    if batch * (channels // norm.num_groups) * height * width == 1:
        raise InputSizeError(
            f'CAFFDINO: a {samples.tensors.shape[-2]}x{samples.tensors.shape[-1]} input gives a 1x1 map at the '
            f'stride-{stride} level, and GroupNorm({norm.num_groups}, hidden_dim={channels}) of the input '
            f'projection cannot normalise one value per group at batch size 1; use images larger than '
            f'{stride}x{stride} px (one side over {stride} px; eval_size / data_aug_scales in the config), a batch '
            f'of 2 or more, or hidden_dim >= {2 * norm.num_groups}')
    return projection(x).contiguous()  # a channels-last backbone map (ResNet at inference) gives one


def _as_nested(samples) -> NestedTensor:
    if isinstance(samples, NestedTensor):
        return samples
    return nested_tensor_from_tensor_list(samples)


class CAFFDINO(nn.Module):
    """The two-stream CAFF-DINO detector.

    Args:
        backbone_visible, backbone_ir: ``Joiner``s (backbone + sine position encoding) of the query-side and
            key/value-side streams (which image is which: ``query_modality``).
        transformer: ``DeformableTransformer`` (DINO, two-stage 'standard'). Its ``d_model`` is ``hidden_dim``,
            its ``num_queries`` (decoder queries selected from the encoder proposals) and ``num_feature_levels``
            (backbone outputs + extra stride-2 levels) are the detector's: they are set once, there.
        num_classes: class logits per query (91 for the COCO-id label space of the reference).
        aux_loss: also return the outputs of the first ``dec_layers - 1`` decoder layers.
        dec_pred_class_embed_share, dec_pred_bbox_embed_share: one head shared by all decoder layers (DINO: True).
        two_stage_class_embed_share, two_stage_bbox_embed_share: encoder-proposal heads shared with the decoder's
            (DINO: False, separate copies).
        dn_number, dn_box_noise_scale, dn_label_noise_ratio, dn_labelbook_size: contrastive denoising
            (``dn_number=0`` disables it); ``label_enc`` has ``dn_labelbook_size + 1`` rows.
        fusion_type, caff_num_stages, caff_kernel_sizes, caff_proj_dim: see ``models/fusion.py``.
        query_modality: ``'ir'`` (the reference) or ``'rgb'``: the image that takes the query role.
        freeze_backbones: ``requires_grad=False`` on both backbones (the reference's CAFF training).
    """

    def __init__(self, backbone_visible: nn.Module, backbone_ir: nn.Module, transformer: nn.Module, num_classes: int,
                 aux_loss: bool = True,
                 dec_pred_class_embed_share: bool = True, dec_pred_bbox_embed_share: bool = True,
                 two_stage_class_embed_share: bool = False, two_stage_bbox_embed_share: bool = False,
                 dn_number: int = 100, dn_box_noise_scale: float = 0.4, dn_label_noise_ratio: float = 0.5,
                 dn_labelbook_size: int = 91, fusion_type: str = 'caff', query_modality: str = 'ir',
                 caff_num_stages: int = 2, caff_kernel_sizes: tuple[int, ...] = (1, 5, 7), caff_proj_dim: int = 64,
                 freeze_backbones: bool = True):
        super().__init__()
        if query_modality not in QUERY_MODALITIES:
            raise ValueError(f'query_modality={query_modality!r} is unknown; choose one of {list(QUERY_MODALITIES)} '
                             f"('ir' reproduces the reference and its released checkpoints)")
        if backbone_visible.strides != backbone_ir.strides:
            raise ValueError(f'backbone and backbone_ir must give feature levels of the same strides (the fusion pairs '
                             f'them), got {backbone_visible.strides} and {backbone_ir.strides}')
        if dn_number > 0:
            check_dn_labelbook(dn_labelbook_size, num_classes)
        num_queries, num_feature_levels = transformer.num_queries, transformer.num_feature_levels
        num_backbone_outs = len(backbone_visible.num_channels)
        if num_feature_levels < num_backbone_outs:
            raise ValueError(f'num_feature_levels={num_feature_levels} is below the {num_backbone_outs} backbone '
                             f'outputs of return_interm_indices; raise num_feature_levels or return fewer stages')
        if (two_stage_class_embed_share or two_stage_bbox_embed_share) and not (
                dec_pred_class_embed_share and dec_pred_bbox_embed_share):
            raise ValueError('two_stage_*_embed_share=True needs dec_pred_class_embed_share and '
                             'dec_pred_bbox_embed_share True (the encoder heads share the one decoder head)')
        hidden_dim = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.hidden_dim = hidden_dim
        self.aux_loss = aux_loss
        self.dn_number = dn_number
        self.dn_box_noise_scale = dn_box_noise_scale
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_labelbook_size = dn_labelbook_size
        self.fusion_type = fusion_type
        self.fusion = build_fusion(fusion_type, caff_num_stages, caff_kernel_sizes, caff_proj_dim)
        self.query_modality = query_modality

        # Registration order = the reference's state-dict order.
        self.transformer = transformer
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden_dim)
        self.backbone_visible = backbone_visible
        self.backbone_ir = backbone_ir
        self.input_proj = build_input_projections(backbone_visible.num_channels, hidden_dim, num_feature_levels)
        self.input_proj_ir = build_input_projections(backbone_ir.num_channels, hidden_dim, num_feature_levels)
        self.conv_corr, self.redim_corr = self.fusion.layers(num_feature_levels, hidden_dim)
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - CLASS_PRIOR_PROB) / CLASS_PRIOR_PROB))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_decoder_layers = transformer.num_decoder_layers
        self.bbox_embed = nn.ModuleList(
            bbox_embed if dec_pred_bbox_embed_share else copy.deepcopy(bbox_embed) for _ in range(num_decoder_layers))
        self.class_embed = nn.ModuleList(class_embed if dec_pred_class_embed_share else copy.deepcopy(class_embed)
                                         for _ in range(num_decoder_layers))
        # The decoder refines boxes with the same heads (state-dict aliases transformer.decoder.*_embed.*);
        # the encoder proposals have their own copies unless shared.
        transformer.decoder.bbox_embed = self.bbox_embed
        transformer.decoder.class_embed = self.class_embed
        transformer.enc_out_bbox_embed = bbox_embed if two_stage_bbox_embed_share else copy.deepcopy(bbox_embed)
        transformer.enc_out_class_embed = class_embed if two_stage_class_embed_share else copy.deepcopy(class_embed)

        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)
        if freeze_backbones:
            freeze_module(self.backbone_visible)
            freeze_module(self.backbone_ir)
        if self.fusion.kept_modality is not None:
            unused = (self.backbone_ir, self.input_proj_ir) if self._keeps_query_stream() else (
                self.backbone_visible, self.input_proj)
            for module in unused:
                freeze_module(module)

    def _keeps_query_stream(self) -> bool:
        """For single-stream fusion: whether the kept image is the query-side one."""
        return self.fusion.kept_modality == self.query_modality

    def _stream(self, joiner: nn.Module, input_proj: nn.ModuleList, samples: NestedTensor, with_pos: bool = True
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        """One spectrum: ``(srcs, masks, pos)`` per level; srcs ``(B, hidden_dim, H_l, W_l)``, masks
        ``(B, H_l, W_l)`` True on padding, pos ``(B, hidden_dim, H_l, W_l)``, or None without ``with_pos``
        (the key/value stream: the reference computes its encodings and never uses them)."""
        features, pos = joiner(samples, with_pos=with_pos)
        extra_levels = self.num_feature_levels - len(features)
        strides = joiner.strides + [joiner.strides[-1] * 2 ** k for k in range(1, extra_levels + 1)]
        srcs = [_project(input_proj[level], feature.tensors, samples, strides[level])
                for level, feature in enumerate(features)]
        masks = [feature.mask for feature in features]
        for level in range(len(features), self.num_feature_levels):
            source = features[-1].tensors if level == len(features) else srcs[-1]
            src = _project(input_proj[level], source, samples, strides[level])
            mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            if pos is not None:
                pos.append(joiner[1](NestedTensor(src, mask)).to(src.dtype))
        return srcs, masks, pos

    def _fused_levels(self, samples_query: NestedTensor, samples_key_value: NestedTensor
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(srcs, masks, pos)`` for the transformer; pos always from the query side (as the reference)."""
        if self.fusion.kept_modality is not None:
            if self._keeps_query_stream():
                return self._stream(self.backbone_visible, self.input_proj, samples_query)
            return self._stream(self.backbone_ir, self.input_proj_ir, samples_key_value)
        srcs_q, masks_q, pos = self._stream(self.backbone_visible, self.input_proj, samples_query)
        srcs_kv, masks_kv, _ = self._stream(self.backbone_ir, self.input_proj_ir, samples_key_value, with_pos=False)
        srcs = []
        for level, (src_q, src_kv) in enumerate(zip(srcs_q, srcs_kv)):
            conv_corr = self.conv_corr[level] if self.conv_corr is not None else None
            redim_corr = self.redim_corr[level] if self.redim_corr is not None else None
            srcs.append(self.fusion.fuse(src_q, src_kv, conv_corr, redim_corr))
        masks = [mask_q | mask_kv for mask_q, mask_kv in zip(masks_q, masks_kv)]
        return srcs, masks, pos

    def forward(self, samples_rgb, samples_ir, targets: list[dict] | None = None) -> dict:
        """Detect objects in a batch of RGB / thermal image pairs.

        Args:
            samples_rgb, samples_ir: NestedTensors (tensors ``(B, 3, H, W)``, mask ``(B, H, W)`` True on padding)
                or lists of ``(3, H, W)`` tensors; the two are paired image by image and padded alike.
            targets: per image ``{'labels' (K,) int64, 'boxes' (K, 4) cxcywh normalised}``; used in training for
                the denoising queries (ignored otherwise).

        Returns:
            ``pred_logits`` ``(B, Q, num_classes)`` and ``pred_boxes`` ``(B, Q, 4)`` (cxcywh normalised to the
            unpadded image) of the last decoder layer; ``aux_outputs``: list of ``dec_layers - 1`` such dicts
            (when ``aux_loss``); ``interm_outputs`` and ``interm_outputs_for_matching_pre``: the encoder's top
            ``Q`` proposals (refined / raw boxes); ``dn_meta``: denoising bookkeeping (None without DN queries),
            whose ``output_known_lbs_bboxes`` holds the DN queries' outputs, split off ``pred_*``.
        """
        samples_rgb, samples_ir = _as_nested(samples_rgb), _as_nested(samples_ir)
        if self.query_modality == 'ir':
            samples_query, samples_key_value = samples_ir, samples_rgb
        else:
            samples_query, samples_key_value = samples_rgb, samples_ir
        srcs, masks, pos = self._fused_levels(samples_query, samples_key_value)

        dn_label = dn_bbox = attn_mask = dn_meta = None
        if self.training and self.dn_number > 0 and targets is not None:
            dn_label, dn_bbox, attn_mask, dn_meta = prepare_for_cdn(
                dn_args=(targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale),
                num_queries=self.num_queries, num_classes=self.num_classes,
                hidden_dim=self.hidden_dim, label_enc=self.label_enc)
        hs, references, hs_enc, ref_enc, init_box_proposal = self.transformer(
            srcs, masks, pos, refpoint_embed=dn_bbox, tgt=dn_label, attn_mask=attn_mask)
        hs = list(hs)
        hs[0] = hs[0] + self.label_enc.weight[0, 0] * 0.0

        # Look-forward-twice refinement: layer l predicts a delta on its (undetached) input reference.
        coords = torch.stack([(bbox_embed(layer_hs) + inverse_sigmoid(layer_ref)).sigmoid()
                              for layer_ref, bbox_embed, layer_hs in zip(references[:-1], self.bbox_embed, hs)])
        logits = torch.stack([class_embed(layer_hs) for class_embed, layer_hs in zip(self.class_embed, hs)])
        if dn_meta is not None:
            logits, coords = dn_post_process(logits, coords, dn_meta, self.aux_loss, self._aux_outputs)

        out = {'pred_logits': logits[-1], 'pred_boxes': coords[-1]}
        if self.aux_loss:
            out['aux_outputs'] = self._aux_outputs(logits, coords)
        interm_logits = self.transformer.enc_out_class_embed(hs_enc[-1])
        out['interm_outputs'] = {'pred_logits': interm_logits, 'pred_boxes': ref_enc[-1]}
        out['interm_outputs_for_matching_pre'] = {'pred_logits': interm_logits, 'pred_boxes': init_box_proposal}
        out['dn_meta'] = dn_meta
        return out

    @staticmethod
    def _aux_outputs(logits: torch.Tensor, coords: torch.Tensor) -> list[dict]:
        """``[{'pred_logits', 'pred_boxes'}]`` of every decoder layer but the last, from stacked (L, B, Q, .)."""
        return [{'pred_logits': a, 'pred_boxes': b} for a, b in zip(logits[:-1], coords[:-1])]
