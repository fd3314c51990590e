"""Readers of the per-image label files the converters meet: Pascal VOC XML and YOLO text.

Both return ``(class, (x0, y0, x1, y1))`` boxes in pixels. A file that cannot be parsed raises
:class:`LabelFileError` with the file and the problem; the converter skips that entry with the message.

- VOC: ``<object><name>`` with ``<bndbox><xmin><ymin><xmax><ymax>``, taken as pixel edges (``w = xmax - xmin``,
  as FLIR-aligned and M3FD annotate; no -1 shift), and ``<size><width><height>`` when present.
- YOLO: one ``class cx cy w h`` line per box, normalised to the image size; the class is the 0-based index into
  the class list given to the converter.
"""
import xml.etree.ElementTree as ElementTree


class LabelFileError(ValueError):
    """A label file that cannot be read; the message names the file and the problem."""


def _number(element, tag: str, path: str) -> float:
    text = element.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise LabelFileError(f'{path}: <{tag}> is {text!r}, not a number') from None


def read_voc(path: str) -> tuple[tuple[int, int] | None, list[tuple[str, tuple[float, float, float, float]]]]:
    """((width, height) from ``<size>`` or None, [(name, xyxy)]) of a Pascal VOC XML file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as err:
        raise LabelFileError(f'{path}: not readable XML ({err})') from None
    size = root.find('size')
    dims = None
    if size is not None and size.findtext('width') and size.findtext('height'):
        dims = (int(_number(size, 'width', path)), int(_number(size, 'height', path)))
    objects = []
    for obj in root.iter('object'):
        box = obj.find('bndbox')
        if box is None:
            raise LabelFileError(f'{path}: an <object> has no <bndbox>')
        name = (obj.findtext('name') or '').strip()
        objects.append((name, tuple(_number(box, tag, path) for tag in ('xmin', 'ymin', 'xmax', 'ymax'))))
    return dims, objects


def read_yolo(path: str, width: int, height: int,
              classes: list[str]) -> list[tuple[str, tuple[float, float, float, float]]]:
    """[(class name, xyxy pixels)] of a YOLO label file for an image of ``width`` x ``height``."""
    objects = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 5:
                raise LabelFileError(f'{path}:{number}: expected 5 fields "class cx cy w h", got {len(fields)}')
            try:
                index, cx, cy, w, h = int(fields[0]), *(float(v) for v in fields[1:])
            except ValueError:
                raise LabelFileError(f'{path}:{number}: expected "class cx cy w h" numbers, got '
                                     f'{line.strip()!r}') from None
            if not 0 <= index < len(classes):
                raise LabelFileError(f'{path}:{number}: class index {index} outside the {len(classes)} classes '
                                     f'given with --classes')
            objects.append((classes[index], ((cx - w / 2) * width, (cy - h / 2) * height,
                                             (cx + w / 2) * width, (cy + h / 2) * height)))
    return objects
