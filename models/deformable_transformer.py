"""The DINO deformable transformer: deformable encoder, two-stage proposals, mixed query selection, decoder.

Follows IDEA-Research/DINO `models/dino/deformable_transformer.py` (itself built on Deformable DETR and DAB-DETR)
for the one path the DINO_4scale / DINO_5scale configs run: two_stage_type 'standard', decoder self-attention
'sa', layer order sa -> ca -> ffn, 4-d anchor queries, look-forward-twice box refinement, post-norm layers.
Parameter names, shapes and state-dict order are DINO's, so `transformer.*` keys of public DINO checkpoints load.

What differs from DINO:
- only that path is built (no 'no' two-stage, no layer sharing/dropping, no patterns, no decoder perturbation);
- tensors stay batch-first (B, N, C) throughout; DINO transposes to (N, B, C) around its decoder. The
  parameters and the math are the same (nn.MultiheadAttention with batch_first=True has the same weights);
- level shapes travel as Python ints next to the tensors, so nothing reads a device tensor back to the host;
- the proposal width/height of level 0 is the `two_stage_default_hw` argument (0.05 hard-coded in DINO);
- `gen_sineembed_for_position` gets d_model / 2 features per coordinate (DINO hard-codes 128 = 256 / 2);
- `hs` and `references` come back stacked as tensors, not as Python lists;
- the FFN's ReLU and residual add run inside its linear layers (`models/fused_layers.py`), and the two-stage
  box head runs on the Q selected tokens only (DINO runs it on all S and gathers): the same values to rounding.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import fused_layers
from models.ops import MSDeformAttn
from models.utils import MLP, gen_sineembed_for_position, get_activation_fn, get_clones
from util.errors import InputSizeError
from util.misc import inverse_sigmoid

SpatialShapes = Sequence[tuple[int, int]]


def valid_ratios_from_mask(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask (True on padding, image in the top-left corner) -> (B, 2) valid fraction (w, h)."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / height
    valid_w = (~mask[:, 0, :]).sum(1).float() / width
    return torch.stack([valid_w, valid_h], -1)


def _long_tensor(values: Sequence, device: torch.device) -> Tensor:
    """An int64 tensor of (nested) sizes such as ``[(H_l, W_l)]``; built from 0-d tensors rather than with
    ``torch.as_tensor``, so that sizes that are symbolic under ``torch.export`` stay symbolic (ONNX export with
    dynamic height and width) instead of being frozen to the traced values."""
    if isinstance(values, (list, tuple)):
        return torch.stack([_long_tensor(v, device) for v in values])
    return torch.full((), values, dtype=torch.long, device=device)


def encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes,
                             default_hw: float = 0.05) -> tuple[Tensor, Tensor]:
    """One box proposal per encoder token, for the two-stage query selection (DINO `gen_encoder_output_proposals`).

    The token at pixel (i, j) of level l proposes the box
        (cx, cy, w, h) = ((j + 0.5) / valid_W, (i + 0.5) / valid_H, hw * 2^l, hw * 2^l),  hw = default_hw,
    normalised to the image (not to the padded map). Proposals outside (0.01, 0.99) in any coordinate and padded
    tokens are invalid: their logit is +inf and their memory is zeroed.

    Args:
        memory: (B, S, C) encoder output, S = sum_l H_l * W_l.
        padding_mask: (B, S) bool, True on padding.
        spatial_shapes: [(H_l, W_l)] for the L levels, in order.
        default_hw: box side of level-0 proposals (doubled at every level).

    Returns:
        output_memory: (B, S, C) memory with invalid tokens zeroed;
        output_proposals: (B, S, 4) proposals as logits (inverse sigmoid of cxcywh), +inf where invalid.
    """
    batch = memory.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        mask = padding_mask[:, start:start + height * width].view(batch, height, width)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=memory.device),
                                        torch.arange(width, dtype=torch.float32, device=memory.device),
                                        indexing='ij')
        centers = torch.stack([grid_x, grid_y], -1)  # (H, W, 2) as (x, y)
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        centers = (centers.unsqueeze(0) + 0.5) / scale  # (B, H, W, 2)
        wh = torch.full_like(centers, default_hw * 2.0 ** level)
        proposals.append(torch.cat([centers, wh], -1).view(batch, -1, 4))
        start += height * width
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    output_proposals = output_proposals.masked_fill(invalid, float('inf'))
    output_memory = memory.masked_fill(invalid, 0.0)
    return output_memory, output_proposals


def dropping(*dropouts: nn.Dropout) -> bool:
    """Whether any of these dropout layers changes its input now (p > 0 in training mode)."""
    return any(d.p > 0 and d.training for d in dropouts)


def feed_forward_residual(x: Tensor, linear1: nn.Linear, activation, dropout_mid: nn.Dropout, linear2: nn.Linear,
                          dropout_out: nn.Dropout) -> Tensor:
    """``x + dropout_out(linear2(dropout_mid(activation(linear1(x)))))`` for ``x`` (..., C).

    The ReLU and, with inactive dropout (eval, or p = 0 as in the DINO configs), the residual are taken by the
    linear layers themselves (``models/fused_layers.py``: one oneDNN kernel each on the CPU without autograd,
    in cache-sized row blocks for the encoder's many tokens).
    """
    dropout_active = dropping(dropout_mid, dropout_out)
    if activation is F.relu and not dropout_active:
        return fused_layers.feed_forward(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias)
    if activation is F.relu:
        hidden = fused_layers.linear(x, linear1.weight, linear1.bias, relu=True)
    else:
        hidden = activation(linear1(x))
    if dropout_active:
        return x + dropout_out(linear2(dropout_mid(hidden)))
    return fused_layers.linear(hidden, linear2.weight, linear2.bias, residual=x)


def attention_residual(attention: MSDeformAttn, dropout: nn.Dropout, x: Tensor, *args) -> Tensor:
    """``x + dropout(attention(*args))``; with inactive dropout the attention's output projection adds ``x``."""
    if dropping(dropout):
        return x + dropout(attention(*args))
    return attention(*args, identity=x)


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: multi-scale deformable self-attention, then FFN.

        x = norm1(x + MSDeformAttn(x + pos, ref, x));  x = norm2(x + linear2(act(linear1(x))))
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, activation: str, n_levels: int, n_heads: int,
                 n_points: int, msda_backend: str = 'auto'):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor],
                spatial_shapes_list: SpatialShapes) -> Tensor:
        """src, pos: (B, S, C); reference_points: (B, S, L, 2), or expanded to (B, S, M, L, P, 2) by
        ``MSDeformAttn.expand_reference_points``; padding_mask: (B, S). Returns (B, S, C)."""
        src = self.norm1(attention_residual(self.self_attn, self.dropout1, src, src + pos, reference_points, src,
                                            spatial_shapes, level_start_index, padding_mask, spatial_shapes_list))
        return self.norm2(feed_forward_residual(src, self.linear1, self.activation, self.dropout2, self.linear2,
                                                self.dropout3))


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer in DINO's order sa -> ca -> ffn.

        q = norm2(q + SelfAttn(q + qpos, q + qpos, q, attn_mask))        (norm2/self_attn named as in DINO)
        q = norm1(q + MSDeformAttn(q + qpos, ref_boxes, memory))
        q = norm3(q + linear2(act(linear1(q))))
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, activation: str, n_levels: int, n_heads: int,
                 n_points: int, msda_backend: str = 'auto'):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                memory_padding_mask: Optional[Tensor], spatial_shapes: Tensor, level_start_index: Tensor,
                self_attn_mask: Optional[Tensor], spatial_shapes_list: SpatialShapes) -> Tensor:
        """
        Args:
            tgt, query_pos: (B, Q, C); reference_points: (B, Q, L, 4) cxcywh scaled by the valid ratios.
            memory: (B, S, C); memory_padding_mask: (B, S) True on padding.
            self_attn_mask: (Q, Q) bool, True where query i may not attend to query j (the DN mask), or None.
        Returns:
            (B, Q, C).
        """
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        tgt = self.norm1(attention_residual(self.cross_attn, self.dropout1, tgt, tgt + query_pos, reference_points,
                                            memory, spatial_shapes, level_start_index, memory_padding_mask,
                                            spatial_shapes_list))
        return self.norm3(feed_forward_residual(tgt, self.linear1, self.activation, self.dropout3, self.linear2,
                                                self.dropout4))


class DeformableTransformerEncoder(nn.Module):
    """A stack of deformable encoder layers; every token samples around its own pixel centre on every level."""

    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = get_clones(encoder_layer, num_layers)

    @staticmethod
    def reference_points(spatial_shapes: SpatialShapes, valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, as fractions of the padded map of every level.

        Args:
            spatial_shapes: [(H_l, W_l)]; valid_ratios: (B, L, 2) as (w, h).
        Returns:
            (B, S, L, 2) as (x, y): the centre of a token normalised by its own level's valid size, then scaled
            by each level's valid ratio (DINO / Deformable DETR `get_reference_points`).
        """
        device = valid_ratios.device
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                                          torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                                          indexing='ij')
            ref_y = ref_y.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack([ref_x, ref_y], -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor, spatial_shapes_list: SpatialShapes) -> Tensor:
        """src, pos: (B, S, C); padding_mask: (B, S); valid_ratios: (B, L, 2). Returns memory (B, S, C)."""
        reference_points = self.reference_points(spatial_shapes_list, valid_ratios)
        if len(self.layers):  # written out once for every head and point, shared by all layers
            reference_points = self.layers[0].self_attn.expand_reference_points(reference_points)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                           spatial_shapes_list)
        return output


class DeformableTransformerDecoder(nn.Module):
    """DINO decoder: conditional query positions from the anchor boxes and iterative box refinement.

    For every layer, with anchors b (B, Q, 4) in sigmoid space:
        query_pos = ref_point_head(sine(b * valid_ratio of level 0))      MLP(2C, C, C, 2)
        q = layer(q, query_pos, b * valid_ratios, memory)
        b_new = sigmoid(bbox_embed[i](q) + inverse_sigmoid(b));  the next layer uses b_new.detach()
    `references` keeps the undetached b_new ("look forward twice"); `hs` is the normed q of every layer.

    `bbox_embed` and `class_embed` are the detector's per-layer heads (ModuleLists), attached by the top model
    as in DINO (`transformer.decoder.bbox_embed = model.bbox_embed`); class_embed is only stored, for the keys.
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = get_clones(decoder_layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        # Slots filled by the detector; registered now so the state-dict order is DINO's whatever the attach order.
        self.register_module('bbox_embed', None)
        self.register_module('class_embed', None)
        self.d_model = d_model

    def forward(self, tgt: Tensor, memory: Tensor, refpoints_unsigmoid: Tensor, memory_padding_mask: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                spatial_shapes_list: SpatialShapes, self_attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """
        Args:
            tgt: (B, Q, C) content queries; refpoints_unsigmoid: (B, Q, 4) anchors as logits.
            memory: (B, S, C); memory_padding_mask: (B, S); valid_ratios: (B, L, 2).
            self_attn_mask: (Q, Q) bool or None.
        Returns:
            hs: (num_layers, B, Q, C); references: (num_layers + 1, B, Q, 4) sigmoid cxcywh, the input anchors
            first.
        """
        if self.bbox_embed is None:
            raise RuntimeError('DeformableTransformerDecoder: bbox_embed is not attached; set '
                               'transformer.decoder.bbox_embed to the detector\'s per-layer box heads (ModuleList)')
        output = tgt
        reference_points = refpoints_unsigmoid.sigmoid()
        references = [reference_points]
        hs = []
        box_scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        for layer_id, layer in enumerate(self.layers):
            reference_points_input = reference_points[:, :, None] * box_scale  # (B, Q, L, 4)
            query_sine_embed = gen_sineembed_for_position(reference_points_input[:, :, 0], self.d_model // 2)
            query_pos = self.ref_point_head(query_sine_embed)
            output = layer(output, query_pos, reference_points_input, memory, memory_padding_mask, spatial_shapes,
                           level_start_index, self_attn_mask, spatial_shapes_list)
            new_reference_points = (self.bbox_embed[layer_id](output) + inverse_sigmoid(reference_points)).sigmoid()
            reference_points = new_reference_points.detach()
            references.append(new_reference_points)
            hs.append(self.norm(output))
        return torch.stack(hs), torch.stack(references)


class DeformableTransformer(nn.Module):
    """DINO's transformer: deformable encoder -> two-stage query selection -> deformable decoder.

    Data flow (B images, L levels, S = sum_l H_l W_l tokens, Q = num_queries, D DN queries, C = d_model):
        srcs/pos per level -> flatten, pos += level_embed[l]          (B, S, C)
        encoder                                                        memory (B, S, C)
        proposals = encoder_output_proposals(memory)                  (B, S, 4) logits
        m = enc_output_norm(enc_output(memory'))                       (B, S, C)
        topk over max_c enc_out_class_embed(m)                         Q indices per image
        anchors  = (enc_out_bbox_embed(m) + proposals)[topk].detach() (B, Q, 4) logits   (mixed query selection:
        content  = tgt_embed.weight                                    (B, Q, C)          boxes from the encoder,
                                                                                          content learnt)
        [DN queries first] decoder(cat(tgt, content), cat(refpoint_embed, anchors), attn_mask)

    Heads, attached by the detector as DINO does (all None until then):
        `decoder.bbox_embed`, `decoder.class_embed` (per-layer ModuleLists shared with the detector),
        `enc_out_bbox_embed` (MLP(C, C, 4, 3)), `enc_out_class_embed` (Linear(C, num_classes)).

    Initialisation (DINO): xavier_uniform on every >1-dim parameter that exists at construction (so tgt_embed is
    xavier: DINO draws it normal and then overwrites it), then each MSDeformAttn's own reset, then level_embed
    normal. The heads attached later keep the detector's initialisation.

    `msda_backend` is the backend every MSDeformAttn of the encoder and decoder asks for (config `msda_backend`;
    the choices and the fallback rule are in models/ops/ms_deform_attn_func.py).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = 'relu', num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 num_queries: int = 900, embed_init_tgt: bool = True, two_stage_default_hw: float = 0.05,
                 msda_backend: str = 'auto'):
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f'DeformableTransformer: d_model (hidden_dim) must be even for the sine query '
                             f'embedding, got {d_model}')
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.num_queries = num_queries
        self.embed_init_tgt = embed_init_tgt
        self.two_stage_default_hw = two_stage_default_hw

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, enc_n_points, msda_backend)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, dec_n_points, msda_backend)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers, d_model)
        # embed_init_tgt=False: the content queries are the selected encoder features, detached (DINO option).
        self.tgt_embed = nn.Embedding(num_queries, d_model) if embed_init_tgt else None
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.register_module('enc_out_bbox_embed', None)
        self.register_module('enc_out_class_embed', None)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def _flatten_levels(self, srcs: Sequence[Tensor], masks: Sequence[Tensor], pos_embeds: Sequence[Tensor]):
        """Per-level maps -> tokens: (B, S, C) src, (B, S) mask, (B, S, C) pos + level_embed, [(H_l, W_l)]."""
        if not len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels:
            raise ValueError(f'DeformableTransformer: expected {self.num_feature_levels} levels '
                             f'(num_feature_levels) of srcs, masks and pos_embeds, got {len(srcs)}, {len(masks)} '
                             f'and {len(pos_embeds)}')
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append((src.shape[-2], src.shape[-1]))
            src_flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        return torch.cat(src_flat, 1), torch.cat(mask_flat, 1), torch.cat(pos_flat, 1), shapes

    def _select_queries(self, memory: Tensor, mask_flatten: Tensor, spatial_shapes_list: SpatialShapes):
        """Two-stage 'standard' selection of the Q best encoder tokens.

        Returns anchors (B, Q, 4) logits, detached; content (B, Q, C); hs_enc (1, B, Q, C) and ref_enc
        (1, B, Q, 4) sigmoid, the undetached selected features and boxes for the encoder loss; and
        init_box_proposal (B, Q, 4) sigmoid, the raw proposals of the selected tokens.
        """
        if self.enc_out_class_embed is None or self.enc_out_bbox_embed is None:
            raise RuntimeError('DeformableTransformer: enc_out_class_embed / enc_out_bbox_embed are not attached; '
                               'the detector must set them (two-stage heads) before the forward')
        num_tokens = memory.shape[1]
        if num_tokens < self.num_queries:
            raise InputSizeError(f'DeformableTransformer: the feature maps have {num_tokens} tokens in all, fewer '
                                 f'than num_queries={self.num_queries}; use larger images (data_aug_scales / '
                                 f'eval_size in the config) or fewer queries (num_queries)')
        output_memory, output_proposals = encoder_output_proposals(memory, mask_flatten, spatial_shapes_list,
                                                                   self.two_stage_default_hw)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        class_logits = self.enc_out_class_embed(output_memory)
        topk = torch.topk(class_logits.max(-1)[0], self.num_queries, dim=1)[1]  # (B, Q)

        def gather(x: Tensor) -> Tensor:
            return torch.gather(x, 1, topk.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        content_undetached = gather(output_memory)
        selected_proposals = gather(output_proposals)
        # The box head is row-wise: running it on the Q selected rows equals gathering it from all S rows.
        anchors_undetached = self.enc_out_bbox_embed(content_undetached) + selected_proposals
        init_box_proposal = selected_proposals.sigmoid()
        if self.embed_init_tgt:
            content = self.tgt_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        else:
            content = content_undetached.detach()
        hs_enc = content_undetached.unsqueeze(0)
        ref_enc = anchors_undetached.sigmoid().unsqueeze(0)
        return anchors_undetached.detach(), content, hs_enc, ref_enc, init_box_proposal

    def forward(self, srcs: Sequence[Tensor], masks: Sequence[Tensor], pos_embeds: Sequence[Tensor],
                refpoint_embed: Optional[Tensor] = None, tgt: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None):
        """
        Args:
            srcs: L maps (B, C, H_l, W_l) (after fusion); masks: L (B, H_l, W_l) bool, True on padding;
            pos_embeds: L (B, C, H_l, W_l).
            refpoint_embed: (B, D, 4) DN anchors as logits, tgt: (B, D, C) DN content queries, attn_mask:
                (D + Q, D + Q) bool, True = blocked; all three from `prepare_for_cdn`, or all None (eval).

        Returns:
            hs: (n_dec, B, D + Q, C) normed decoder outputs, DN queries first;
            references: (n_dec + 1, B, D + Q, 4) sigmoid cxcywh anchors: the input anchors, then each layer's
                refined boxes (undetached);
            hs_enc: (1, B, Q, C) selected encoder features; ref_enc: (1, B, Q, 4) their sigmoid boxes;
            init_box_proposal: (B, Q, 4) sigmoid proposals of the selected tokens (before enc_out_bbox_embed).
        """
        if (refpoint_embed is None) != (tgt is None):
            raise ValueError('DeformableTransformer: refpoint_embed and tgt (the DN queries) must be given together')
        src_flatten, mask_flatten, pos_flatten, shapes = self._flatten_levels(srcs, masks, pos_embeds)
        device = src_flatten.device
        spatial_shapes = _long_tensor(shapes, device)
        starts = [0]
        for height, width in shapes[:-1]:
            starts.append(starts[-1] + height * width)
        level_start_index = _long_tensor(starts, device)
        valid_ratios = torch.stack([valid_ratios_from_mask(m) for m in masks], 1)  # (B, L, 2)

        memory = self.encoder(src_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios,
                              mask_flatten, shapes)
        anchors, content, hs_enc, ref_enc, init_box_proposal = self._select_queries(memory, mask_flatten, shapes)
        if refpoint_embed is not None:
            anchors = torch.cat([refpoint_embed, anchors], 1)
            content = torch.cat([tgt, content], 1)
        hs, references = self.decoder(content, memory, anchors, mask_flatten, spatial_shapes, level_start_index,
                                      valid_ratios, shapes, attn_mask)
        return hs, references, hs_enc, ref_enc, init_box_proposal
