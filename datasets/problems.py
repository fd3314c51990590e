"""A tally of data problems by kind: how many, the first few examples, and what each kind means for a run.

`datasets/annotations.py` records what it finds in an annotation file (bad entries, boxes it clips or drops),
`datasets/check.py` what it finds on disk (missing, corrupt or mis-sized images). Every kind has one severity,
which decides what happens (`KINDS` is the one table of them):

- ``error``: the annotation file (or layout) must be fixed; nothing runs on it.
- ``bad pair``: the image pair cannot be used. A training split with ``skip_bad_pairs`` leaves it out before
  training (counted and named); any other split stops the run before training starts.
- ``fixed``: a box was clipped to its image or dropped, the same way in the training targets and in the
  evaluation ground truth; reported with a count and the first few ids.
- ``note``: worth knowing (EXIF rotation applied, 16-bit image stretched), nothing to fix.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

ERROR, BAD_PAIR, FIXED, NOTE = 'error', 'bad pair', 'fixed', 'note'
SEVERITIES = (ERROR, BAD_PAIR, FIXED, NOTE)
MAX_EXAMPLES = 5

# kind -> (severity, what it means, as it reads after a count)
KINDS = {
    'layout': (ERROR, 'data folders or annotation file not found'),
    'annotation_file': (ERROR, 'annotation file unreadable or not COCO'),
    'bad_image_entry': (ERROR, 'image entries with a bad width or height'),
    'annotation_missing_keys': (ERROR, 'annotations without image_id, bbox or category_id'),
    'unknown_image_id': (ERROR, 'annotations of an image id that "images" does not list'),
    'bad_bbox': (ERROR, 'annotations whose bbox is not 4 finite numbers [x, y, width, height]'),
    'bad_category_id': (ERROR, 'annotations whose category_id is not an integer'),
    'category_out_of_range': (ERROR, 'annotations whose category_id is outside [0, num_classes)'),
    'bad_iscrowd': (ERROR, 'annotations whose iscrowd is not 0 or 1'),
    'missing_file': (BAD_PAIR, 'pairs with a missing image file'),
    'unreadable_image': (BAD_PAIR, 'pairs with an unreadable, truncated or corrupt image'),
    'size_mismatch': (BAD_PAIR, 'pairs whose RGB and IR images differ in size'),
    'json_size_mismatch': (BAD_PAIR, 'pairs whose JSON width/height differ from the image file'),
    'box_clipped': (FIXED, 'boxes partly outside their image, clipped to it'),
    'box_outside': (FIXED, 'boxes entirely outside their image, dropped'),
    'box_degenerate': (FIXED, 'boxes of zero or negative width or height, dropped'),
    'size_from_file': (NOTE, 'images without width/height in the JSON (taken from the file)'),
    'exif_rotated': (NOTE, 'images turned upright by their EXIF orientation'),
    'high_bit_depth': (NOTE, 'images wider than 8 bits, mapped to 0..255 by high_bit_depth_rule'),
}


@dataclass
class Example:
    """One occurrence: `ref` is short (an id, a file name) for reports; `message` is the whole one-line story."""
    ref: str
    message: str


@dataclass
class ProblemLog:
    """Counts per kind (in first-seen order) and up to `max_examples` examples of each."""
    max_examples: int = MAX_EXAMPLES
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, kind: str, ref: str, message: Optional[str] = None) -> None:
        if kind not in KINDS:
            raise KeyError(f'unknown problem kind {kind!r}; known: {sorted(KINDS)}')
        self.counts[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < self.max_examples:
            kept.append(Example(ref, message or ref))

    def extend(self, other: 'ProblemLog') -> None:
        for kind, count in other.counts.items():
            self.counts[kind] += count
            kept = self.examples.setdefault(kind, [])
            kept.extend(other.examples[kind][:self.max_examples - len(kept)])

    def kinds(self, *severities: str) -> list[str]:
        """Kinds present, in first-seen order, restricted to `severities` when given."""
        return [k for k in self.counts if not severities or KINDS[k][0] in severities]

    def total(self, *severities: str) -> int:
        return sum(self.counts[k] for k in self.kinds(*severities))

    def first(self, *severities: str) -> Optional[Example]:
        """The first example of the first kind of these severities, or None."""
        kinds = self.kinds(*severities)
        return self.examples[kinds[0]][0] if kinds else None

    def summary(self, kind: str) -> str:
        """'3 boxes partly outside their image, clipped to it: ann 4 of image 7, ...' (one line)."""
        refs = ', '.join(e.ref for e in self.examples[kind])
        more = ', ...' if self.counts[kind] > len(self.examples[kind]) else ''
        return f'{self.counts[kind]} {KINDS[kind][1]} [{kind}]: {refs}{more}'
