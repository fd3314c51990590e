"""The report of one conversion: what was written per split and class, what was refused and why.

``Report.text()`` is what ``tools/convert.py`` prints; ``Report.to_dict()`` is deterministic (no file counts) and is
written as ``OUT/conversion_report.json``, so a second identical run leaves it byte for byte as it was.
"""
from dataclasses import dataclass, field


@dataclass
class Report:
    """What a conversion wrote and refused. ``to_dict()`` is deterministic (written as conversion_report.json)."""
    command: str
    source: str
    out_dir: str
    layout: str
    dataset_file: str
    categories: list[dict]
    splits: dict = field(default_factory=dict)  # split -> {'pairs', 'boxes': {class: n}, 'ignored': {reason: n}}
    skipped: list = field(default_factory=list)  # [entry, reason]
    dropped_boxes: dict = field(default_factory=dict)  # reason -> {'count', 'examples'}
    notes: dict = field(default_factory=dict)  # what else is worth knowing -> count
    annotation_files: dict = field(default_factory=dict)  # split -> path (splits without pairs have none)
    files_written: int = 0
    files_up_to_date: int = 0
    annotations_written: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {'command': self.command, 'source': self.source, 'layout': self.layout,
                'dataset_file': self.dataset_file, 'categories': self.categories, 'splits': self.splits,
                'skipped': self.skipped, 'dropped_boxes': self.dropped_boxes, 'notes': self.notes,
                'annotation_files': self.annotation_files}

    def text(self) -> str:
        """The printed report: pairs and boxes per split and class, skipped entries, dropped boxes, files."""
        lines = [f'{self.command}: {self.source} -> {self.out_dir} ({self.layout} layout; '
                 f'use --dataset_file {self.dataset_file} --coco_path {self.out_dir})']
        mapping = ', '.join(f'{c["name"]} {c["id"]}' for c in self.categories)
        top = max((c['id'] for c in self.categories), default=0)
        lines.append(f'  category ids: {mapping} (num_classes must be > {top}; the released 91-wide heads fit)')
        for split, counts in self.splits.items():
            boxes = ', '.join(f'{name} {n}' for name, n in counts['boxes'].items()) or 'none'
            line = f'  {split}: {counts["pairs"]} pairs; boxes: {boxes}'
            if not counts['pairs']:
                line = f'  {split}: no pairs, no annotation file written'
            if counts['ignored']:
                reasons = ', '.join(f'{reason} {n}' for reason, n in counts['ignored'].items())
                line += f'; ignore regions: {sum(counts["ignored"].values())} ({reasons})'
            lines.append(line)
        if self.skipped:
            lines.append(f'  skipped {len(self.skipped)} entries:')
            lines += [f'    {entry}: {reason}' for entry, reason in self.skipped]
        for reason, dropped in self.dropped_boxes.items():
            lines.append(f'  dropped {dropped["count"]} boxes ({reason}), e.g. in {", ".join(dropped["examples"])}')
        lines += [f'  {note}: {count}' for note, count in self.notes.items()]
        written = ', '.join(self.annotations_written) or 'none (all up to date)'
        lines.append(f'  image files: {self.files_written} written, {self.files_up_to_date} up to date; '
                     f'annotation files written: {written}')
        return '\n'.join(lines)
