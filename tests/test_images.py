"""datasets/images.py: EXIF orientation, bit depth and channel rules, header/decoded probes, unreadable files."""
import numpy as np
import PIL.Image
import pytest

from datasets.images import (BadPairError, BitDepthRule, image_size, is_high_bit_depth, probe_image, read_image,
                             to_rgb)
from util.config import ConfigError

ORIENTATION = 274


def quadrants(height=32, width=48) -> np.ndarray:
    """An (H, W, 3) image of four flat coloured quadrants (JPEG keeps their centres), different in every corner."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w] = (250, 10, 10)
    image[:h, w:] = (10, 250, 10)
    image[h:, :w] = (10, 10, 250)
    image[h:, w:] = (250, 250, 10)
    return image


def displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF specification's meaning of each orientation value, written with numpy (rows = y)."""
    return {
        1: lambda a: a,
        2: np.fliplr,                              # mirrored left-right
        3: lambda a: np.rot90(a, 2),               # upside down
        4: np.flipud,                              # mirrored top-bottom
        5: lambda a: np.rot90(np.fliplr(a), 1),    # mirrored, then turned 270 degrees clockwise (= transpose)
        6: lambda a: np.rot90(a, -1),              # turned 90 degrees clockwise
        7: lambda a: np.rot90(np.fliplr(a), -1),   # mirrored, then turned 90 degrees clockwise
        8: lambda a: np.rot90(a, 1),               # turned 270 degrees clockwise
    }[orientation](stored)


def save_with_orientation(array: np.ndarray, path, orientation: int) -> None:
    image = PIL.Image.fromarray(array)
    exif = PIL.Image.Exif()
    exif[ORIENTATION] = orientation
    if path.suffix == '.tif':
        image.save(path, exif=exif)
    else:
        image.save(path, exif=exif.tobytes(), **({'quality': 95} if path.suffix == '.jpg' else {}))


def block_centres(array: np.ndarray) -> np.ndarray:
    """The colour at the centre of each quadrant (robust to JPEG ringing at the edges)."""
    h, w = array.shape[:2]
    return np.array([array[y, x] for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)], dtype=np.int32)


@pytest.mark.parametrize('suffix', ['.png', '.jpg', '.tif'])
@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_is_applied_and_probes_report_the_displayed_size(tmp_path, suffix, orientation):
    stored = quadrants()
    path = tmp_path / f'frame{suffix}'
    save_with_orientation(stored, path, orientation)
    expected = displayed(stored, orientation)
    image = read_image(str(path))
    assert image.mode == 'RGB' and image.size == (expected.shape[1], expected.shape[0])
    got = np.asarray(image)
    if suffix == '.jpg':
        assert np.abs(block_centres(got) - block_centres(expected)).max() < 40
    else:
        assert np.array_equal(got, expected)
    assert probe_image(str(path)).size == image.size
    assert image_size(str(path)) == image.size  # header only
    assert probe_image(str(path)).orientation == orientation


def test_8bit_rgb_and_grey_read_like_the_reference(tmp_path):
    """The reference reads both modalities with PIL .convert('RGB'); for 8-bit files the pixels are the same."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    for name, array in (('rgb.png', rgb), ('grey.png', grey), ('rgb.jpg', rgb), ('grey.jpg', grey)):
        PIL.Image.fromarray(array).save(tmp_path / name)
        with PIL.Image.open(tmp_path / name) as reference:
            assert np.array_equal(np.asarray(read_image(str(tmp_path / name))), np.asarray(reference.convert('RGB')))
    grey_read = np.asarray(read_image(str(tmp_path / 'grey.png')))
    assert np.array_equal(grey_read[..., 0], grey) and np.array_equal(grey_read[..., 0], grey_read[..., 2])


def thermal_counts(height=40, width=50) -> np.ndarray:
    """A 16-bit thermal-like frame: a ramp over 20000..30000 counts (far above 255), a hot spot."""
    counts = np.linspace(20000, 30000, height * width).reshape(height, width)
    counts[5:8, 5:8] = 40000  # 9 of 2000 pixels: above the 99th percentile, so it saturates
    return counts


def stretched(values: np.ndarray, lo_pct=1.0, hi_pct=99.0) -> np.ndarray:
    """Independent percentile stretch: lo -> 0, hi -> 255, linear, saturating beyond."""
    lo, hi = np.percentile(values, [lo_pct, hi_pct])
    return np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize('kind', ['I;16 png', 'I;16 tif', 'I;16B tif', 'I tif', 'F tif'])
def test_high_bit_depth_thermal_is_stretched_not_clipped(tmp_path, kind):
    mode, fmt = kind.split()
    counts = thermal_counts()
    path = tmp_path / f'ir.{fmt}'
    if mode == 'I;16B':
        PIL.Image.frombytes('I;16B', (50, 40), counts.astype('>u2').tobytes()).save(path)
    else:
        dtype = {'I;16': np.uint16, 'I': np.int32, 'F': np.float32}[mode]
        PIL.Image.fromarray(counts.astype(dtype)).save(path)
    with PIL.Image.open(path) as raw:
        assert is_high_bit_depth(raw.mode)
        clipped = np.asarray(raw.convert('RGB'))
    assert clipped.min() == clipped.max() == 255  # what PIL's own conversion (the reference) does: all white
    image = np.asarray(read_image(str(path)))
    assert image.shape == (40, 50, 3) and np.array_equal(image[..., 0], image[..., 1])
    assert np.abs(image[..., 0].astype(int) - stretched(counts)).max() <= 1
    assert image[..., 0].min() == 0 and image[..., 0].max() == 255
    assert len(np.unique(image[..., 0])) > 200  # the ramp keeps its contrast


def test_range_rule_maps_fixed_raw_values():
    rule = BitDepthRule('range', [1000, 2000])
    values = np.array([[0, 1000, 1500], [2000, 3000, 1250]], dtype=np.uint16)
    assert rule.to_uint8(values).tolist() == [[0, 0, 128], [255, 255, 64]]


def test_percentile_limits_are_configurable_and_min_max_is_0_100():
    values = np.arange(101, dtype=np.float64).reshape(1, 101) * 10
    assert BitDepthRule('percentile', [0, 100]).to_uint8(values).tolist()[0][::50] == [0, 128, 255]
    narrow = BitDepthRule('percentile', [10, 90]).to_uint8(values)[0]
    assert narrow[:11].tolist() == [0] * 11 and narrow[90:].tolist() == [255] * 11


def test_flat_nearly_flat_and_non_finite_frames():
    rule = BitDepthRule()
    assert rule.to_uint8(np.full((4, 4), 3000.0)).max() == 0  # constant -> black
    nearly = np.full((20, 20), 3000.0)
    nearly[0, 0] = 3500.0  # percentiles coincide: min/max used, the one warm pixel shows
    out = rule.to_uint8(nearly)
    assert out[0, 0] == 255 and out[1:, :].max() == 0
    with_nan = np.array([[np.nan, 0.0], [np.inf, 10.0]])
    assert BitDepthRule('percentile', [0, 100]).to_uint8(with_nan).tolist() == [[0, 0], [0, 255]]
    assert rule.to_uint8(np.full((2, 2), np.nan)).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize('rule, limits, message', [
    ('clip', [1, 99], "high_bit_depth_rule = 'clip' is not one of"),
    ('percentile', [99, 1], r'high_bit_depth_limits = \[99, 1\]: give two finite numbers'),
    ('percentile', [1], r'high_bit_depth_limits = \[1\]'),
    ('percentile', [-5, 99], 'must lie in'),
    ('range', [0, float('inf')], 'finite'),
])
def test_bad_rule_values_are_config_errors_naming_the_key(rule, limits, message):
    with pytest.raises(ConfigError, match=message):
        BitDepthRule(rule, limits)


@pytest.mark.parametrize('mode, colour, expected', [
    ('RGBA', (10, 20, 30, 0), (10, 20, 30)),    # alpha dropped, colour kept
    ('LA', (77, 128), (77, 77, 77)),
    ('1', 1, (255, 255, 255)),
    ('L', 90, (90, 90, 90)),
    ('CMYK', (0, 255, 255, 0), (255, 0, 0)),
    ('YCbCr', (76, 85, 255), (254, 0, 0)),
])
def test_channel_modes_become_rgb(mode, colour, expected):
    image = to_rgb(PIL.Image.new(mode, (3, 2), colour))
    assert image.mode == 'RGB' and image.size == (3, 2)
    assert np.abs(np.asarray(image)[0, 0].astype(int) - expected).max() <= 2


def test_palette_and_rgba_files_read_as_rgb(tmp_path):
    palette = PIL.Image.new('P', (4, 4), 0)
    palette.putpalette([12, 34, 56] + [0, 0, 0] * 255)
    palette.save(tmp_path / 'p.png')
    PIL.Image.new('RGBA', (4, 4), (200, 100, 50, 128)).save(tmp_path / 'rgba.png')
    assert np.asarray(read_image(str(tmp_path / 'p.png')))[0, 0].tolist() == [12, 34, 56]
    assert np.asarray(read_image(str(tmp_path / 'rgba.png')))[0, 0].tolist() == [200, 100, 50]


def noisy_file(path, size=(64, 48)):
    rng = np.random.default_rng(1)
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize('suffix', ['.png', '.jpg'])
def test_truncated_file_fails_the_decoding_probe_and_the_reader(tmp_path, suffix):
    path = noisy_file(tmp_path / f'cut{suffix}')
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    assert image_size(str(path)) == (64, 48)  # the header alone is intact
    for read in (probe_image, read_image):
        with pytest.raises(BadPairError, match=rf'cut{suffix}: unreadable, truncated or corrupt image') as info:
            read(str(path))
        assert '\n' not in str(info.value)


@pytest.mark.parametrize('content, message', [
    (b'', 'unreadable, truncated or corrupt'),
    (b'definitely not an image', 'unreadable, truncated or corrupt'),
    (None, 'file not found'),
])
def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / 'bad.png'
    if content is not None:
        path.write_bytes(content)
    for read in (probe_image, read_image, image_size):
        with pytest.raises(BadPairError, match=f'bad.png: {message}') as info:
            read(str(path))
        assert '\n' not in str(info.value)


def test_folder_instead_of_file(tmp_path):
    (tmp_path / 'x.png').mkdir()
    with pytest.raises(BadPairError, match='x.png: is a folder'):
        read_image(str(tmp_path / 'x.png'))


def test_jpeg_completeness_check(tmp_path, monkeypatch):
    """A JPEG passes when its end-of-image marker follows its image data, with or without trailing bytes;
    an FF D9 before the image data (a comment, an EXIF thumbnail) does not make a cut file pass."""
    from datasets import images
    path = tmp_path / 'a.jpg'
    rng = np.random.default_rng(2)
    PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        path, comment=b'thumbnail ends \xff\xd9 here')
    whole = path.read_bytes()
    assert probe_image(str(path)).size == (64, 48)
    path.write_bytes(whole + b'\x00' * 100)  # trailing data some cameras append
    assert probe_image(str(path)).size == (64, 48)
    path.write_bytes(whole[:-300])
    with pytest.raises(BadPairError, match='truncated'):
        probe_image(str(path))
    decoded = []
    monkeypatch.setattr(images, 'JPEG_TAIL', 64)  # trailing data longer than the tail searched: decoded instead
    real_load = PIL.Image.Image.load
    monkeypatch.setattr(PIL.Image.Image, 'load', lambda self: decoded.append(1) or real_load(self))
    path.write_bytes(whole + b'\x00' * 100)
    assert probe_image(str(path)).size == (64, 48) and decoded


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib
    return len(data).to_bytes(4, 'big') + kind + data + zlib.crc32(kind + data).to_bytes(4, 'big')


def test_png_damage_and_late_exif_are_found_without_decoding(tmp_path):
    path = noisy_file(tmp_path / 'a.png')
    whole = path.read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF  # one byte inside the image data: its chunk's CRC no longer matches
    path.write_bytes(bytes(flipped))
    with pytest.raises(BadPairError, match='a chunk fails its CRC check'):
        probe_image(str(path))
    exif = PIL.Image.Exif()
    exif[ORIENTATION] = 6
    late = whole[:-12] + png_chunk(b'eXIf', exif.tobytes()) + whole[-12:]  # after the image data, before IEND
    path.write_bytes(late)
    assert probe_image(str(path)).orientation == 6
    assert probe_image(str(path)).size == read_image(str(path)).size == (48, 64)


def test_unreadable_exif_block_means_no_orientation(tmp_path):
    path = tmp_path / 'a.png'
    PIL.Image.fromarray(quadrants()).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-12] + png_chunk(b'eXIf', b'MM\x00*garbage') + whole[-12:])
    assert probe_image(str(path)).orientation == 1
    assert np.array_equal(np.asarray(read_image(str(path))), quadrants())
