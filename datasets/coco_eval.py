"""COCO bbox evaluation of detections, gathered across ranks.

Follows the role of DETR's ``datasets/coco_eval.py`` (which CAFF-DINO ships unchanged): detections are collected
per image in xyxy pixels, converted to COCO's xywh, scored with pycocotools ``COCOeval(iouType='bbox')``.

What differs from DETR:
- Detections are gathered as plain result lists (one ``all_gather`` of the JSON-ready rows) and evaluated once on
  the full set, instead of gathering the per-image ``evalImgs`` arrays and patching ``COCOeval`` internals.
- Per-class AP / AP50 is computed from ``COCOeval.eval['precision']`` and printed as a table (FLIR has three
  classes; the overall numbers hide which one fails).
- ``write_results`` dumps the detections as a COCO results JSON with the annotation file's own image ids: a
  file whose ids were not ints was read with int ids (``image_id_map`` of the data set); the original ids
  (strings, zero-padded digit strings) are put back, so the JSON scores against the user's file. Rows hold the
  COCO result fields only: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h pixels), ``score``.
- Images may be seen twice under a distributed sampler that pads the last batch; each image counts once.

Labels are used as COCO ``category_id`` unchanged: the model's class head is indexed by raw category id
(num_classes 91 in the reference configs), as in DINO and CAFF-DINO.
"""
import contextlib
import copy
import io
import json
import os

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util import dist

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
RESULT_FIELDS = ('image_id', 'category_id', 'bbox', 'score')


class CocoEvaluator:
    """Accumulates detections and evaluates them against a ground-truth ``COCO`` object.

    Usage: ``update({image_id: {'scores' (N,), 'labels' (N,), 'boxes' (N,4) xyxy pixels}})`` per batch, then
    ``synchronize_between_processes()``, ``accumulate()``, ``summarize()``. After that ``stats`` holds the 12
    standard COCO numbers (``STAT_NAMES`` order) and ``per_class`` a list of ``(name, AP, AP50)``.
    ``image_id_map`` ({original id: int id}, as ``PairedCocoDataset.image_id_map``) gives the ids written by
    ``write_results``; the evaluation itself runs on the int ids of ``coco_gt``.
    """

    def __init__(self, coco_gt: COCO, image_id_map: dict | None = None):
        self.coco_gt = copy.deepcopy(coco_gt)
        self._original_ids = {int(v): k for k, v in image_id_map.items()} if image_id_map else {}
        self._per_image: dict[int, list[dict]] = {}
        self.coco_eval: COCOeval | None = None
        self.stats = np.full(len(STAT_NAMES), -1.0)
        self.per_class: list[tuple[str, float, float]] = []

    @property
    def img_ids(self) -> list[int]:
        return sorted(self._per_image)

    @property
    def results(self) -> list[dict]:
        """JSON-ready detections ``{image_id, category_id, bbox (x, y, w, h), score}`` ordered by image id."""
        return [row for image_id in self.img_ids for row in self._per_image[image_id]]

    def update(self, predictions: dict) -> None:
        """Add the detections of some images; an image seen again (a padded sampler) replaces its old entry."""
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            boxes = pred['boxes'].detach().float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist() if boxes.numel() else []
            scores = pred['scores'].detach().float().cpu().tolist()
            labels = pred['labels'].detach().cpu().tolist()
            self._per_image[image_id] = [
                {'image_id': image_id, 'category_id': int(label), 'bbox': box, 'score': float(score)}
                for box, score, label in zip(xywh, scores, labels)]

    def synchronize_between_processes(self) -> None:
        """Merge every rank's detections; afterwards each rank holds the full set."""
        merged: dict[int, list[dict]] = {}
        for rank_results in dist.all_gather(self._per_image):
            merged.update(rank_results)
        self._per_image = merged

    def accumulate(self) -> None:
        """Run ``COCOeval`` (evaluate + accumulate) on the images seen so far."""
        if not self.img_ids:
            raise ValueError('CocoEvaluator.accumulate: no images were evaluated (empty validation loader?)')
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes(self.results) if self.results else COCO()
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType='bbox')
            coco_eval.params.imgIds = sorted(self.img_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
        self.coco_eval = coco_eval

    def summarize(self) -> str:
        """Compute ``stats`` and ``per_class``; return the printable COCO summary plus the per-class table."""
        if self.coco_eval is None:
            raise RuntimeError('CocoEvaluator.summarize called before accumulate()')
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            self.coco_eval.summarize()
        self.stats = np.asarray(self.coco_eval.stats, dtype=float)
        self.per_class = self._per_class_ap()
        return buffer.getvalue() + self.per_class_table()

    def _per_class_ap(self) -> list[tuple[str, float, float]]:
        # precision: (T iou thresholds, R recall points, K categories, A area ranges, M max dets); -1 = no data.
        precision = self.coco_eval.eval['precision']
        params = self.coco_eval.params
        area_all = params.areaRngLbl.index('all')
        iou50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
        rows = []
        for k, cat_id in enumerate(params.catIds):
            if not self.coco_gt.getAnnIds(catIds=[cat_id], imgIds=params.imgIds):
                continue
            p = precision[:, :, k, area_all, -1]
            p50 = p[iou50]
            ap = float(p[p > -1].mean()) if (p > -1).any() else float('nan')
            ap50 = float(p50[p50 > -1].mean()) if (p50 > -1).any() else float('nan')
            rows.append((self.coco_gt.cats[cat_id]['name'], ap, ap50))
        return rows

    def per_class_table(self) -> str:
        width = max([len('class')] + [len(name) for name, _, _ in self.per_class])
        lines = [f'{"class":<{width}}  {"AP":>6}  {"AP50":>6}']
        lines += [f'{name:<{width}}  {100 * ap:6.2f}  {100 * ap50:6.2f}' for name, ap, ap50 in self.per_class]
        return '\n'.join(lines) + '\n'

    def stats_dict(self) -> dict[str, float]:
        """The 12 COCO numbers by name, plus ``AP_<class>`` / ``AP50_<class>`` per class."""
        out = {name: float(v) for name, v in zip(STAT_NAMES, self.stats)}
        for name, ap, ap50 in self.per_class:
            out[f'AP_{name}'] = ap
            out[f'AP50_{name}'] = ap50
        return out

    def original_id(self, image_id: int):
        """The annotation file's id of the image evaluated as int ``image_id``."""
        return self._original_ids.get(int(image_id), int(image_id))

    def write_results(self, path: str) -> None:
        """Write the detections as a COCO results JSON: a list of ``{image_id, category_id, bbox xywh, score}``
        with the annotation file's own image ids (:meth:`original_id`)."""
        rows = [{**{k: row[k] for k in RESULT_FIELDS}, 'image_id': self.original_id(row['image_id'])}
                for row in self.results]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(rows, f)
