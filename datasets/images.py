"""Reading one image file the way cameras write it: EXIF orientation, bit depth and channels -> 8-bit RGB.

The reference (CAFF-DINO's `datasets/torchvision_datasets/coco.py`) reads both modalities with
`PIL.Image.open(path).convert('RGB')` (docs/REFERENCE.md §6.4). That is right for the 8-bit JPEGs of LLVIP and
FLIR, and this module returns the same pixels for them. What differs, for the files real cameras write:

- EXIF orientation (tag 274) is applied, to both images, so a phone or camera frame stored sideways is used the
  way it is displayed; PIL's `open` ignores it (Pillow applies it itself to TIFF files; the result is the same).
- Images wider than 8 bits per pixel (PIL modes `I;16`, `I;16B`, `I;16L`, `I` (32-bit int), `F` (float): raw
  thermal frames in 16-bit PNG or TIFF) are mapped to 0..255 by a :class:`BitDepthRule`. `convert('RGB')`
  clips them at 255 instead, so a 16-bit thermal frame becomes a constant white image. The rule:

  * ``'percentile'`` (default): per image, the value at percentile ``p_low`` maps to 0 and the value at
    ``p_high`` to 255, linearly; the few pixels beyond saturate. With (1, 99), the hottest and coldest 1 % of
    a frame saturate and the rest keeps its full contrast, whatever range the camera's counts span (the
    released weights were trained on 8-bit frames whose camera had already stretched them that way). When
    the two percentiles coincide (an almost flat frame) the minimum and maximum are used; a constant frame
    becomes 0. Non-finite values (NaN, inf in float files) become 0 and take no part in the percentiles.
  * ``'range'``: the fixed raw values (``low``, ``high``) map to 0 and 255 for every image, so one raw value
    always gives the same grey level (for radiometric data where absolute temperature matters).

  8-bit images are left as they are. 16-bit colour PNGs are read by PIL as 8-bit RGB (the high byte of each
  value: a linear map, not a clip).
- Channels: a single-channel image (`1`, `L`, or the result of the bit-depth rule) is repeated into three equal
  channels, as the reference does for grey IR JPEGs; `RGBA`, `LA`, `PA` drop their alpha channel (the colour
  values are kept as stored); `P` (palette), `CMYK`, `YCbCr`, `LAB`, `HSV` are converted to RGB by PIL.

:func:`read_image` decodes a file for training; :func:`probe_image` reads what the data checks need (size after
orientation, mode) without building the RGB image, and with ``verify`` makes sure the pixel data is all there,
without decoding where the format allows: every chunk of a PNG must pass its CRC up to IEND; a JPEG must end
with its end-of-image marker after its image data (a truncated JPEG is what makes PIL's decoder fail; one
without the marker in its tail is decoded at 1/8 scale); other formats (TIFF, BMP, ...) are decoded once. Any
unreadable file raises :class:`BadPairError` naming the file.
"""
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps

from util.config import ConfigError
from util.errors import DataError

ORIENTATION_TAG = 274
# Orientations 5-8 turn the stored image by 90 degrees: width and height swap.
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
BIT_DEPTH_RULES = ('percentile', 'range')
# 8-bit single-channel modes (an alpha channel, if any, is dropped): repeated into three equal channels.
GREY_MODES = ('1', 'L', 'LA', 'La')
# Bytes at the end of a JPEG searched for its end-of-image marker (room for trailing data some cameras append).
JPEG_TAIL = 1 << 16
# Errors PIL raises for a file that is not a readable image (truncated, corrupt, unknown format, too many pixels).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
                 PIL.Image.DecompressionBombError)


class BadPairError(DataError):
    """An image pair that cannot be used: a file is missing, unreadable or corrupt, or the two sizes differ."""


def is_high_bit_depth(mode: str) -> bool:
    """Whether a PIL mode holds more than 8 bits per pixel (`I;16*`, `I`, `F`): such images need a BitDepthRule."""
    return mode in ('I', 'F') or mode.startswith('I;')


@dataclass(frozen=True)
class BitDepthRule:
    """How an image wider than 8 bits becomes 0..255 (see the module docstring): `rule` and its two `limits`.

    The config keys `high_bit_depth_rule` and `high_bit_depth_limits`. `limits` are percentiles in [0, 100]
    (low < high) for 'percentile', raw pixel values (low < high) for 'range'. Bad values raise ConfigError.
    """
    rule: str = 'percentile'
    limits: tuple = (1.0, 99.0)

    def __post_init__(self):
        if self.rule not in BIT_DEPTH_RULES:
            raise ConfigError(f'high_bit_depth_rule = {self.rule!r} is not one of {BIT_DEPTH_RULES}')
        limits = tuple(self.limits) if isinstance(self.limits, (list, tuple)) else ()
        if (len(limits) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limits)
                or not all(math.isfinite(v) for v in limits) or not limits[0] < limits[1]):
            raise ConfigError(f'high_bit_depth_limits = {self.limits!r}: give two finite numbers [low, high] with '
                              f'low < high')
        if self.rule == 'percentile' and not 0 <= limits[0] < limits[1] <= 100:
            raise ConfigError(f'high_bit_depth_limits = {list(limits)}: with high_bit_depth_rule = \'percentile\' '
                              f'they are percentiles and must lie in [0, 100]')
        object.__setattr__(self, 'limits', tuple(float(v) for v in limits))

    def to_uint8(self, values: np.ndarray) -> np.ndarray:
        """(H, W) array of any numeric dtype -> (H, W) uint8: out = round(255 * clamp((v - lo) / (hi - lo), 0, 1)).

        (lo, hi) are the limits for 'range'; for 'percentile' the limits' percentiles of the image's finite
        values, or its min and max when they coincide. Non-finite values give 0; so does a constant image.
        """
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        if self.rule == 'range':
            lo, hi = self.limits
        elif not finite.any():
            return np.zeros(values.shape, dtype=np.uint8)
        else:
            valid = values[finite]
            lo, hi = np.percentile(valid, self.limits)
            if hi <= lo:
                lo, hi = valid.min(), valid.max()
            if hi <= lo:
                return np.zeros(values.shape, dtype=np.uint8)
        scaled = np.clip((np.where(finite, values, lo) - lo) / (hi - lo), 0.0, 1.0)
        return np.rint(scaled * 255.0).astype(np.uint8)


DEFAULT_BIT_DEPTH = BitDepthRule()


@dataclass(frozen=True)
class ImageInfo:
    """What the data checks know of one image file: size after EXIF orientation, PIL mode and format, and the
    orientation tag (1 = none)."""
    width: int
    height: int
    mode: str
    format: str
    orientation: int = 1

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _orientation_of(exif: PIL.Image.Exif) -> int:
    value = exif.get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _parsed_exif(data: bytes) -> PIL.Image.Exif:
    """An EXIF block parsed from raw bytes; empty when they are not a readable EXIF block."""
    exif = PIL.Image.Exif()
    try:
        if data:
            exif.load(data)
    except DECODE_ERRORS:
        return PIL.Image.Exif()
    return exif


def _orientation(image: PIL.Image.Image) -> int:
    try:
        return _orientation_of(image.getexif())
    except DECODE_ERRORS:
        return 1  # an unreadable EXIF block: no orientation (the pixels decide whether the file is usable)


def _stored_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) as stored in the file, before orientation (TIFF: its ImageWidth / ImageLength tags)."""
    tags = getattr(image, 'tag_v2', None)
    if tags is not None and 256 in tags and 257 in tags:
        return int(tags[256]), int(tags[257])
    return image.size


def _header_info(image: PIL.Image.Image) -> ImageInfo:
    """ImageInfo from the header only. Pillow reports TIFF sizes already oriented; other formats are swapped here.

    A PNG whose EXIF block follows the pixel data is seen as unrotated here (reading it means decoding the file).
    """
    if image.format == 'PNG' and 'exif' not in image.info:
        orientation = 1
    else:
        orientation = _orientation(image)
    width, height = image.size
    if orientation in SWAPPING_ORIENTATIONS and image.size == _stored_size(image):
        width, height = height, width
    return ImageInfo(width, height, image.mode, image.format or '?', orientation)


def _jpeg_scan_start(fp) -> int | None:
    """Offset of a JPEG's image data (just after its first start-of-scan segment), from its marker segments;
    None when the markers do not lead there."""
    fp.seek(0)
    if fp.read(2) != b'\xff\xd8':
        return None
    while fp.read(1) == b'\xff':
        code = fp.read(1)
        while code == b'\xff':  # fill bytes
            code = fp.read(1)
        if not code:
            return None
        if code == b'\x01' or b'\xd0' <= code <= b'\xd7':  # markers without a length
            continue
        length = int.from_bytes(fp.read(2), 'big')
        if length < 2:
            return None
        if code == b'\xda':
            return fp.tell() + length - 2
        fp.seek(length - 2, 1)
    return None


def _jpeg_is_complete(fp) -> bool:
    """Whether a JPEG file has its end-of-image marker (FF D9) after the start of its image data.

    A JPEG cut short loses it (a decoder then fails with "image file is truncated"), and FF D9 cannot occur
    inside entropy-coded data, so this finds what decoding finds in a truncated file without decoding it.
    Only the last JPEG_TAIL bytes are read; False when the marker is not there (the caller then decodes).
    """
    start = _jpeg_scan_start(fp)
    end = fp.seek(0, 2)
    found = False
    if start is not None and start < end:
        fp.seek(max(start, end - JPEG_TAIL))
        found = b'\xff\xd9' in fp.read()
    fp.seek(0)
    return found


def _png_chunks(fp) -> bytes | None:
    """Walks every chunk of a PNG file, checking its CRC, up to IEND; returns the eXIf payload (b'' if none).

    None when a chunk is cut short or fails its CRC, or IEND never comes: what makes a decoder fail on a
    truncated or damaged PNG, found at the cost of reading the file once (no inflating, no filtering).
    """
    fp.seek(8)
    exif = b''
    while True:
        header = fp.read(8)
        if len(header) < 8:
            return None
        length, kind = int.from_bytes(header[:4], 'big'), header[4:]
        data, crc = fp.read(length), fp.read(4)
        if len(data) < length or len(crc) < 4 or zlib.crc32(kind + data) != int.from_bytes(crc, 'big'):
            return None
        if kind == b'eXIf':
            exif = data
        if kind == b'IEND':
            return exif


def _decoded_info(image: PIL.Image.Image) -> ImageInfo:
    """ImageInfo of a file whose pixel data is all there (module docstring); OSError when it is not."""
    width, height = image.size
    if image.format == 'PNG':
        exif = _png_chunks(image.fp)
        if exif is None:
            raise OSError('the PNG ends early or a chunk fails its CRC check')
        declared = _orientation_of(_parsed_exif(exif))
    else:
        declared = _orientation(image)
    if image.format == 'JPEG':
        if not _jpeg_is_complete(image.fp):
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    elif image.format != 'PNG':
        image.load()
        # Pillow turns a TIFF while loading it (and drops its tag): the size is already upright.
        if _orientation(image) not in SWAPPING_ORIENTATIONS:
            return ImageInfo(width, height, image.mode, image.format or '?', declared)
    if declared in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width, height, image.mode, image.format or '?', declared)


def _unreadable(path: str, err: BaseException) -> BadPairError:
    if isinstance(err, FileNotFoundError):
        return BadPairError(f'{path}: file not found')
    if isinstance(err, IsADirectoryError):
        return BadPairError(f'{path}: is a folder, not an image file')
    if isinstance(err, PermissionError):
        return BadPairError(f'{path}: no permission to read it')
    detail = ' '.join(str(err).split()) or type(err).__name__
    return BadPairError(f'{path}: unreadable, truncated or corrupt image ({type(err).__name__}: {detail}); '
                        f'replace the file or leave the pair out')


def probe_image(path: str, verify: bool = True) -> ImageInfo:
    """The size (after EXIF orientation), mode and format of an image file; BadPairError if it cannot be read.

    With `verify` the pixel data is checked (module docstring) so a truncated or corrupt file fails here; without
    it only the header is read (a file cut short after its header passes).
    """
    try:
        with PIL.Image.open(path) as image:
            return _decoded_info(image) if verify else _header_info(image)
    except DECODE_ERRORS as err:
        raise _unreadable(path, err) from None


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file as it is displayed (EXIF orientation applied), from its header only."""
    return probe_image(path, verify=False).size


def to_rgb(image: PIL.Image.Image, bit_depth: BitDepthRule = DEFAULT_BIT_DEPTH) -> PIL.Image.Image:
    """An 8-bit RGB copy of a decoded (and already oriented) image: the bit-depth and channel rules above."""
    if image.mode == 'RGB':
        return image.copy()
    if is_high_bit_depth(image.mode):
        grey = PIL.Image.fromarray(bit_depth.to_uint8(np.asarray(image)))
        return grey.convert('RGB')
    if image.mode in GREY_MODES:
        return image.convert('L').convert('RGB')
    return image.convert('RGB')


def _upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """A copy of a loaded image turned by its EXIF orientation (as it is, when its EXIF block is unreadable)."""
    try:
        return PIL.ImageOps.exif_transpose(image)
    except DECODE_ERRORS:
        return image.copy()


def read_image(path: str, bit_depth: BitDepthRule = DEFAULT_BIT_DEPTH) -> PIL.Image.Image:
    """Decodes an image file as 8-bit RGB, EXIF orientation applied (module docstring); BadPairError if unusable."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            oriented = _upright(image)
    except DECODE_ERRORS as err:
        raise _unreadable(path, err) from None
    try:
        return to_rgb(oriented, bit_depth)
    except ValueError as err:  # PIL has no conversion for this mode
        raise BadPairError(f'{path}: PIL mode {oriented.mode!r} cannot be converted to RGB ({err}); save the '
                           f'image as 8-bit grey or RGB') from None
