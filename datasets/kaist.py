"""The KAIST multispectral pedestrian benchmark's conventions, and the data set that is scored by MR^-2.

Not in the reference (CAFF-DINO ships LLVIP and FLIR). KAIST (Hwang et al., CVPR 2015) labels pedestrians in
640 x 512 RGB / thermal frame pairs named ``setXX/VYYY/I#####`` and is reported as the log-average miss rate
(``datasets/kaist_eval.py``). The conventions, in one place for the converter (``tools/converters/kaist.py``),
the synthetic KAIST-style data (``datasets/synthetic.py``) and the evaluator:

- ``person`` is the one class, category id :data:`PERSON_ID` = 1 (COCO's and FLIR's person, so a 91-wide head
  from a COCO or released FLIR checkpoint keeps its meaning; ``num_classes`` must be >= 2).
- ``people`` (a group), ``cyclist`` and ``person?`` (unsure) are ignore regions, and so is any person box that
  the "reasonable" setting excludes (under 55 px tall, heavily occluded, outside the 5 px border).
- How a box travels in the COCO JSON (:func:`kaist_annotation`): ``category_id`` 1 for every box, plus ``label``
  (the original label), ``height`` (px), ``occlusion`` (0 none, 1 partial, 2 heavy) and ``ignore`` (1 for an
  ignore region). An ignore region also has ``iscrowd`` 1: the paired reader leaves crowd boxes out of the
  training target and COCO AP treats them as crowd regions, so an ignore region is never a training target and
  never a false positive, in either metric (``tests/test_convert.py`` checks the targets).
- Sets 00-02 and 06-08 were recorded by day, 03-05 and 09-11 at night (:func:`time_of_day`); image entries carry
  ``time_of_day`` so the evaluator reports all / day / night. Image ids are the frame names (strings); the
  dataset maps them to ints (``image_id_map``).
"""
import re

from datasets.kaist_eval import REASONABLE, EvalSetting, MissRateEvaluator
from datasets.pairs import PairedCocoDataset

PERSON = 'person'
PERSON_ID = 1
IGNORE_LABELS = ('people', 'cyclist', 'person?')
CATEGORIES = ({'id': PERSON_ID, 'name': PERSON},)
DAY_SETS = frozenset((0, 1, 2, 6, 7, 8))
NIGHT_SETS = frozenset((3, 4, 5, 9, 10, 11))
FRAME_NAME = re.compile(r'^set(\d\d)/V(\d\d\d)/I(\d{5})$')


def time_of_day(frame: str) -> str | None:
    """'day' or 'night' of a KAIST frame name ``setXX/VYYY/I#####`` from its set number; None for other sets."""
    match = FRAME_NAME.match(frame)
    if not match:
        raise ValueError(f'{frame!r} is not a KAIST frame name setXX/VYYY/I#####')
    number = int(match.group(1))
    return 'day' if number in DAY_SETS else 'night' if number in NIGHT_SETS else None


def ignore_reason(label: str, bbox_xywh, occlusion: int, width: float, height: float,
                  setting: EvalSetting = REASONABLE) -> str | None:
    """Why a box is an ignore region ('label', 'height', 'occlusion', 'border'), or None for an evaluated person."""
    if label != PERSON:
        return 'label'
    return setting.exclusion(bbox_xywh, occlusion, width, height)


def kaist_annotation(label: str, bbox_xywh, occlusion: int, width: float, height: float,
                     setting: EvalSetting = REASONABLE) -> tuple[dict, str | None]:
    """The COCO annotation of one KAIST box (without ``id`` / ``image_id``) and its ignore reason (or None)."""
    reason = ignore_reason(label, bbox_xywh, occlusion, width, height, setting)
    x, y, w, h = (float(v) for v in bbox_xywh)
    ignore = int(reason is not None)
    return {'bbox': [x, y, w, h], 'area': w * h, 'category_id': PERSON_ID, 'label': label, 'height': h,
            'occlusion': int(occlusion), 'ignore': ignore, 'iscrowd': ignore}, reason


class KaistDataset(PairedCocoDataset):
    """A paired data set in the KAIST convention (``--dataset_file kaist_fusion``): scored by MR^-2 beside COCO AP."""

    def benchmark_evaluator(self) -> MissRateEvaluator:
        """A fresh MR^-2 evaluator (reasonable setting, all / day / night) over this data set's ground truth."""
        return MissRateEvaluator(self.coco, PERSON_ID, REASONABLE)
