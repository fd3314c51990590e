"""Log-average miss rate (MR^-2) of pedestrian detections, the KAIST benchmark's metric, gathered across ranks.

Not in the reference (CAFF-DINO reports COCO AP only). Written from the benchmark's definition (Dollar et al.,
"Pedestrian detection: an evaluation of the state of the art", PAMI 2012; Hwang et al., KAIST, CVPR 2015):

- Ground truth. Only boxes of the evaluated category (``category_id``, the person) take part; boxes of other
  categories are left out. A person box is an *ignore region* when its annotation says so (``ignore`` or
  ``iscrowd`` set: ``people``, ``cyclist``, ``person?``) or when the setting excludes it. The "reasonable"
  setting (:data:`REASONABLE`) keeps boxes at least 55 px tall, with occlusion 0 (none) or 1 (partial), and
  inside the border ``x in [5, W - 5]``, ``y in [5, H - 5]`` (``[5, 635] x [5, 507]`` for KAIST's 640 x 512).
- Matching, per image, detections in decreasing score: a detection matches the unmatched non-ignored box of
  highest IoU >= 0.5 (a true positive); failing that, if it overlaps an ignore region by
  ``|d ∩ g| / |d| >= 0.5`` it is neither a true nor a false positive (an ignore region absorbs any number of
  detections); otherwise it is a false positive.
- Curve: the kept detections of every image, in decreasing score; after the first k of them
  ``fppi_k = FP_k / N_images`` and ``miss_k = 1 - TP_k / N_persons`` (non-ignored boxes).
- MR^-2: at each of the 9 FPPI points ``f_i = 10^(-2 + i/4)``, i = 0..8, take the miss rate of the last
  operating point with ``fppi <= f_i`` (1 when there is none), floor it at 1e-10, and average in log space:
  ``MR = exp(mean_i log(max(1e-10, miss(f_i))))``. A perfect detector scores 1e-10 (0.00 %), one that finds
  nothing 1 (100 %). The floor is Dollar's toolbox's; MLPD's Python script has none (exactly 0 there).
- Subsets: ``all`` and one per value of the image field ``time_of_day`` (``day``, ``night``); FPPI divides by
  the subset's image count. Only images that received predictions (every evaluated image) count.

Differences from MLPD's ``evaluation_script.py`` (measured in README.md: the same curves; all / night equal, day
within 0.014 points on its published detections): exact FPPI points (MLPD rounds them to 4 decimals, 0.0316 for
0.031623), the 1e-10 floor, a miss rate of 1 where no operating point lies below an FPPI point (MLPD's index -1
then reads the last point's recall), and no cap of 1000 detections per image (the model keeps ``num_select``).
"""
import math
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO

FPPI_POINTS = 10.0 ** (np.arange(9) / 4 - 2)  # the 9 points 10^(-2:0.25:0), exponents exact: 1e-2 ... 1e0
IOU_THRESHOLD = 0.5
MISS_RATE_FLOOR = 1e-10
SUBSET_FIELD = 'time_of_day'
SUBSET_ORDER = ('day', 'night')

TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1


@dataclass(frozen=True)
class EvalSetting:
    """Which person boxes are evaluated; the rest are ignore regions. Heights in px, border in px from each edge."""
    name: str
    min_height: float
    max_height: float
    occlusions: tuple[int, ...]
    border: float

    def exclusion(self, bbox_xywh, occlusion: int, width: float, height: float) -> str | None:
        """Why this setting ignores a box ('height', 'occlusion', 'border'), or None when it is evaluated."""
        x, y, w, h = bbox_xywh
        if not self.min_height <= h <= self.max_height:
            return 'height'
        if occlusion not in self.occlusions:
            return 'occlusion'
        if x < self.border or y < self.border or x + w > width - self.border or y + h > height - self.border:
            return 'border'
        return None

    def describe(self) -> str:
        occ = '/'.join(('none', 'partial', 'heavy')[o] for o in self.occlusions)
        tall = f'>= {self.min_height:g} px' if math.isinf(self.max_height) else \
            f'in [{self.min_height:g}, {self.max_height:g}] px'
        return f'{self.name}: height {tall}, occlusion {occ}, inside a {self.border:g} px border'


REASONABLE = EvalSetting('reasonable', 55, math.inf, (0, 1), 5)


def box_overlaps(dt_xyxy: np.ndarray, gt_xyxy: np.ndarray, gt_ignore: np.ndarray) -> np.ndarray:
    """(D, G) overlaps: IoU with a regular box, ``|d ∩ g| / |d|`` with an ignore region (``gt_ignore`` True)."""
    ix = np.minimum(dt_xyxy[:, None, 2], gt_xyxy[None, :, 2]) - np.maximum(dt_xyxy[:, None, 0], gt_xyxy[None, :, 0])
    iy = np.minimum(dt_xyxy[:, None, 3], gt_xyxy[None, :, 3]) - np.maximum(dt_xyxy[:, None, 1], gt_xyxy[None, :, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    area_d = ((dt_xyxy[:, 2] - dt_xyxy[:, 0]) * (dt_xyxy[:, 3] - dt_xyxy[:, 1]))[:, None]
    area_g = ((gt_xyxy[:, 2] - gt_xyxy[:, 0]) * (gt_xyxy[:, 3] - gt_xyxy[:, 1]))[None, :]
    denominator = np.where(gt_ignore[None, :], area_d, area_d + area_g - inter)
    return np.divide(inter, denominator, out=np.zeros_like(inter), where=denominator > 0)


def match_image(dt_xyxy: np.ndarray, dt_scores: np.ndarray, gt_xyxy: np.ndarray, gt_ignore: np.ndarray,
                iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Outcome per detection of one image: TRUE_POSITIVE, FALSE_POSITIVE or IGNORED (see the module docstring).

    ``dt_xyxy`` (D, 4), ``dt_scores`` (D,), ``gt_xyxy`` (G, 4), ``gt_ignore`` (G,) bool. Returns (D,) int8 in the
    detections' input order.
    """
    outcome = np.full(len(dt_scores), FALSE_POSITIVE, dtype=np.int8)
    if len(gt_xyxy) == 0 or len(dt_scores) == 0:
        return outcome
    overlaps = box_overlaps(dt_xyxy, gt_xyxy, gt_ignore)
    unmatched = ~gt_ignore.copy()
    for d in np.argsort(-dt_scores, kind='stable'):
        regular = np.where(unmatched, overlaps[d], -1.0)
        best = int(np.argmax(regular))
        if regular[best] >= iou_threshold:
            unmatched[best] = False
            outcome[d] = TRUE_POSITIVE
        elif (overlaps[d][gt_ignore] >= iou_threshold).any():
            outcome[d] = IGNORED
    return outcome


def miss_rate_curve(scores: np.ndarray, outcome: np.ndarray, num_persons: int,
                    num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(fppi, miss rate) after each kept detection, in decreasing score (ties keep their input order)."""
    kept = outcome != IGNORED
    order = np.argsort(-scores[kept], kind='stable')
    true_positive = outcome[kept][order] == TRUE_POSITIVE
    fppi = np.cumsum(~true_positive) / num_images
    miss = 1.0 - np.cumsum(true_positive) / num_persons
    return fppi, miss


def log_average_miss_rate(fppi: np.ndarray, miss: np.ndarray, points: np.ndarray = FPPI_POINTS,
                          floor: float = MISS_RATE_FLOOR) -> float:
    """``exp(mean_i log(max(floor, miss(f_i))))`` over ``points``, miss(f) of the last point with fppi <= f, else 1."""
    last = np.searchsorted(fppi, points, side='right') - 1
    at_points = np.where(last >= 0, miss[np.clip(last, 0, None)] if len(miss) else 1.0, 1.0)
    return float(np.exp(np.mean(np.log(np.maximum(floor, at_points)))))


@dataclass
class SubsetResult:
    """MR^-2 of one subset with its counts; ``miss_rate`` is NaN when the subset has no evaluated person."""
    name: str
    images: int
    persons: int
    true_positives: int
    false_positives: int
    miss_rate: float


class MissRateEvaluator:
    """Accumulates detections and scores them with MR^-2 against a ground-truth ``COCO`` (all / day / night).

    Same protocol as ``CocoEvaluator``: ``update({image_id: {'scores' (N,), 'labels' (N,), 'boxes' (N,4) xyxy
    pixels}})`` per batch, ``synchronize_between_processes()``, ``accumulate()``, ``summarize() -> str``. Then
    ``results`` holds a :class:`SubsetResult` per subset and ``stats_dict()`` the MR^-2 values by subset name.
    Detections of labels other than ``category_id`` are not scored.
    """

    stats_key = 'miss_rate'

    def __init__(self, coco_gt: COCO, category_id: int = 1, setting: EvalSetting = REASONABLE,
                 iou_threshold: float = IOU_THRESHOLD):
        self.category_id = category_id
        self.setting = setting
        self.iou_threshold = iou_threshold
        self._gt = {image_id: self._image_ground_truth(coco_gt, image_id) for image_id in coco_gt.getImgIds()}
        self._subset_of = {image_id: coco_gt.imgs[image_id].get(SUBSET_FIELD) for image_id in coco_gt.getImgIds()}
        self._per_image: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.results: list[SubsetResult] = []

    def _image_ground_truth(self, coco_gt: COCO, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes xyxy (G, 4), ignore (G,) bool) of the evaluated category in one image."""
        image = coco_gt.imgs[image_id]
        boxes, ignore = [], []
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if ann['category_id'] != self.category_id:
                continue
            x, y, w, h = ann['bbox']
            boxes.append([x, y, x + w, y + h])
            flagged = bool(ann.get('ignore', 0)) or bool(ann.get('iscrowd', 0))
            excluded = self.setting.exclusion(ann['bbox'], int(ann.get('occlusion', 0)),
                                              image.get('width', math.inf), image.get('height', math.inf))
            ignore.append(flagged or excluded is not None)
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(ignore, dtype=bool)

    def update(self, predictions: dict) -> None:
        """Add the detections of some images; an image seen again (a padded sampler) replaces its old entry."""
        for image_id, pred in predictions.items():
            keep = pred['labels'].detach().cpu() == self.category_id
            boxes = pred['boxes'].detach().cpu().double()[keep].numpy().reshape(-1, 4)
            scores = pred['scores'].detach().cpu().double()[keep].numpy()
            self._per_image[int(image_id)] = (boxes, scores)

    def synchronize_between_processes(self) -> None:
        """Merge every rank's detections; afterwards each rank holds the full set."""
        from util import dist
        merged: dict = {}
        for rank_results in dist.all_gather(self._per_image):
            merged.update(rank_results)
        self._per_image = merged

    def _subsets(self) -> list[tuple[str, list[int]]]:
        images = sorted(i for i in self._per_image if i in self._gt)
        if not images:
            raise ValueError('MissRateEvaluator.accumulate: no images were evaluated (empty validation loader?)')
        values = {self._subset_of[i] for i in images} - {None}
        names = [v for v in SUBSET_ORDER if v in values] + sorted(str(v) for v in values - set(SUBSET_ORDER))
        return [('all', images)] + [(name, [i for i in images if self._subset_of[i] == name]) for name in names]

    def accumulate(self) -> None:
        """Match every image once, then compute MR^-2 per subset."""
        outcomes = {}
        for image_id in sorted(i for i in self._per_image if i in self._gt):
            boxes, scores = self._per_image[image_id]
            gt_boxes, gt_ignore = self._gt[image_id]
            outcomes[image_id] = match_image(boxes, scores, gt_boxes, gt_ignore, self.iou_threshold)
        self.results = []
        for name, images in self._subsets():
            scores = np.concatenate([self._per_image[i][1] for i in images])
            outcome = np.concatenate([outcomes[i] for i in images])
            persons = int(sum((~self._gt[i][1]).sum() for i in images))
            if persons:
                fppi, miss = miss_rate_curve(scores, outcome, persons, len(images))
                value = log_average_miss_rate(fppi, miss)
            else:
                value = float('nan')
            self.results.append(SubsetResult(name, len(images), persons, int((outcome == TRUE_POSITIVE).sum()),
                                             int((outcome == FALSE_POSITIVE).sum()), value))

    def summarize(self) -> str:
        """The printable table: MR^-2 per subset with its image, person, TP and FP counts."""
        if not self.results:
            raise RuntimeError('MissRateEvaluator.summarize called before accumulate()')
        lines = [f'log-average miss rate MR^-2 (FPPI 1e-2..1e0, IoU {self.iou_threshold:g}; '
                 f'{self.setting.describe()})',
                 f'{"subset":<7} {"images":>7} {"persons":>8} {"TP":>6} {"FP":>7} {"MR^-2":>8}']
        for r in self.results:
            value = 'n/a' if math.isnan(r.miss_rate) else f'{100 * r.miss_rate:.2f} %'
            lines.append(f'{r.name:<7} {r.images:>7} {r.persons:>8} {r.true_positives:>6} {r.false_positives:>7} '
                         f'{value:>8}')
        return '\n'.join(lines) + '\n'

    def stats_dict(self) -> dict[str, float]:
        """MR^-2 (a fraction, lower is better) by subset: ``{'all': ..., 'day': ..., 'night': ...}``."""
        return {r.name: r.miss_rate for r in self.results}

    def selection(self) -> dict:
        """The model-selection score (higher is better): ``1 - MR^-2`` of ``all``; -inf when no person is evaluated."""
        value = self.stats_dict().get('all', float('nan'))
        return {'name': '1 - MR^-2 (all)', 'value': float('-inf') if math.isnan(value) else 1.0 - value}

