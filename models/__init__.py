"""Model package and its one builder: ``build_model(cfg) -> (model, criterion, postprocessors)``.

This is the only place below ``main.py`` that reads the config for the model, the criterion and the
post-processor; every constructor it calls takes modules and scalars. It follows ``build_dino`` of
IDEA-Research/DINO (``models/dino/dino.py``) and CAFF-DETR's CAFF-DINO, with these differences:

- both backbones, the fusion and the modality routing are chosen by config keys (``backbone``, ``backbone_ir``,
  ``fusion_type``, ``query_modality``, ``caff_*``) instead of being hard-coded;
- ``dn_labelbook_size`` is checked against ``num_classes`` first (the fork base indexes out of range later);
- freezing of both backbones happens once at build (``freeze_backbones``), not in every training epoch.

The sub-packages are imported lazily inside :func:`build_model`, so ``import models.ops`` (or any other part)
does not pull in the whole detector.
"""

__all__ = ['build_model']


def build_model(cfg):
    """Build the CAFF-DINO detector, its SetCriterion and ``{'bbox': PostProcess}`` from a config.

    Args:
        cfg: a loaded config (``util.config.load_config``); keys are listed in docs/ARCHITECTURE.md.

    Returns:
        ``(model, criterion, postprocessors)``; the model is on the CPU (move it with ``.to(device)``), or on the
        current default device (e.g. inside ``with torch.device('meta')``).
    """
    from .backbones import build_backbone
    from .caff_dino import CAFFDINO
    from .criterion import SetCriterion, build_weight_dict
    from .deformable_transformer import DeformableTransformer
    from .dn_components import check_dn_labelbook
    from .matcher import HungarianMatcher
    from .ops import backend_from_config
    from .postprocess import PostProcess

    if cfg.use_dn:
        check_dn_labelbook(cfg.dn_labelbook_size, cfg.num_classes)  # before the (slow) backbones are built
    msda_backend = backend_from_config(cfg.msda_backend)  # $CAFF_MSDA_BACKEND, if set, overrides the config

    def backbone(name):
        return build_backbone(name, return_interm_indices=list(cfg.return_interm_indices), dilation=cfg.dilation,
                              use_checkpoint=cfg.use_checkpoint, pe_temperatureH=cfg.pe_temperatureH,
                              pe_temperatureW=cfg.pe_temperatureW, hidden_dim=cfg.hidden_dim)

    transformer = DeformableTransformer(
        d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
        activation=cfg.transformer_activation, num_queries=cfg.num_queries, num_feature_levels=cfg.num_feature_levels,
        enc_n_points=cfg.enc_n_points, dec_n_points=cfg.dec_n_points, embed_init_tgt=cfg.embed_init_tgt,
        two_stage_default_hw=cfg.two_stage_default_hw, msda_backend=msda_backend)
    model = CAFFDINO(
        backbone_visible=backbone(cfg.backbone), backbone_ir=backbone(cfg.backbone_ir or cfg.backbone),
        transformer=transformer, num_classes=cfg.num_classes, aux_loss=cfg.aux_loss,
        dec_pred_class_embed_share=cfg.dec_pred_class_embed_share,
        dec_pred_bbox_embed_share=cfg.dec_pred_bbox_embed_share,
        two_stage_class_embed_share=cfg.two_stage_class_embed_share,
        two_stage_bbox_embed_share=cfg.two_stage_bbox_embed_share,
        dn_number=cfg.dn_number if cfg.use_dn else 0, dn_box_noise_scale=cfg.dn_box_noise_scale,
        dn_label_noise_ratio=cfg.dn_label_noise_ratio, dn_labelbook_size=cfg.dn_labelbook_size,
        fusion_type=cfg.fusion_type, query_modality=cfg.query_modality, caff_num_stages=cfg.caff_num_stages,
        caff_kernel_sizes=tuple(cfg.caff_kernel_sizes), caff_proj_dim=cfg.caff_proj_dim,
        freeze_backbones=cfg.freeze_backbones)

    matcher = HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox,
                               cost_giou=cfg.set_cost_giou, focal_alpha=cfg.focal_alpha)
    weight_dict = build_weight_dict(cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef, cfg.interm_loss_coef,
                                    cfg.dec_layers, cfg.use_dn, cfg.aux_loss)
    criterion = SetCriterion(cfg.num_classes, matcher=matcher, weight_dict=weight_dict,
                             focal_alpha=cfg.focal_alpha)
    postprocessors = {'bbox': PostProcess(num_select=cfg.num_select, nms_iou_threshold=cfg.nms_iou_threshold)}
    return model, criterion, postprocessors
