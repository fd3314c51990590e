"""The data check: every pair of a split probed on disk, before the first training step and by tools/check_dataset.py.

Not in the reference, which finds a bad image when the data loader reaches it (a corrupt validation image after a
whole training epoch) and reads 16-bit or rotated images wrongly without a word. For each image entry of a
split's annotation file:

- both files exist and are complete (`datasets/images.py::probe_image`: the header, then the pixel data: every
  PNG chunk's CRC, a JPEG's end-of-image marker, other formats decoded once; so a truncated or corrupt file is
  caught), and their sizes after EXIF orientation agree;
- the entry's `width`/`height`, when given, agree with the IR file (the size reference of a pair);
- the annotations are normalised with the sizes of the files (`datasets/annotations.py`), so boxes outside the
  image are clipped or dropped in the training targets and the evaluation ground truth alike, and counted.

Problems are tallied by kind (`datasets/problems.py`). What a bad pair does depends on the split: a training set
built with `skip_bad_pairs` leaves it out (counted, first ones named); any other split stops the run with one
DataError line before training starts.

Speed: files are probed by a pool of threads (PIL decodes and zlib checks CRCs without the GIL), and each result
is cached on disk, keyed by the file's absolute path, size and modification time, in one JSON file per image
folder under ``$CAFF_DATA_CHECK_CACHE`` (default ``~/.cache/caff-dino/data-check``; ``off`` disables the cache).
A second check of unchanged files only stats them.
"""
import concurrent.futures
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from datasets.annotations import (NormalisedAnnotations, PairNames, check_top_level, normalise_annotations,
                                  normalise_images, original_image_ids, read_annotation_file)
from datasets.images import BadPairError, ImageInfo, is_high_bit_depth, probe_image
from datasets.problems import BAD_PAIR, ERROR, FIXED, NOTE, SEVERITIES, ProblemLog
from util import dist
from util.errors import DataError, UserError

logger = logging.getLogger('caff_dino.datasets')

CACHE_ENV = 'CAFF_DATA_CHECK_CACHE'
CACHE_VERSION = 1
MAX_WORKERS = 16


def default_workers() -> int:
    """Threads for probing: the CPUs this process may use (at most MAX_WORKERS)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def default_cache_root() -> Optional[str]:
    """$CAFF_DATA_CHECK_CACHE, or ~/.cache/caff-dino/data-check; None when the variable says 'off'."""
    root = os.environ.get(CACHE_ENV)
    if root is not None and root.strip().lower() in ('', 'off', 'none', '0'):
        return None
    return root or os.path.join(os.path.expanduser('~'), '.cache', 'caff-dino', 'data-check')


# A probe outcome: ImageInfo, or the one-line message of an unreadable file, or None for a missing file.
Outcome = Optional[ImageInfo | str]


class ProbeCache:
    """Probe outcomes kept between runs: {absolute path: [size, mtime_ns, verified, outcome]} per image folder.

    A header-only outcome does not answer a request that wants the pixels verified. Unreadable cache files
    are ignored; a cache that cannot be written is reported once and the check goes on without it.
    """

    def __init__(self, root: Optional[str]):
        self.root = root
        self._entries: dict[str, dict] = {}
        self._changed: set[str] = set()

    def _file(self, folder: str) -> str:
        digest = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:20]
        return os.path.join(self.root, f'{digest}.json')

    def _folder(self, folder: str) -> dict:
        if folder not in self._entries:
            entries = {}
            if self.root is not None:
                try:
                    with open(self._file(folder), encoding='utf-8') as f:
                        saved = json.load(f)
                    if saved.get('version') == CACHE_VERSION:
                        entries = saved['entries']
                except (OSError, ValueError, KeyError, AttributeError):
                    entries = {}
            self._entries[folder] = entries
        return self._entries[folder]

    def get(self, folder: str, path: str, st: os.stat_result, verify: bool) -> tuple[bool, Outcome]:
        """(found, outcome) for `path` as it is now."""
        entry = self._folder(folder).get(os.path.abspath(path))
        if not entry or entry[0] != st.st_size or entry[1] != st.st_mtime_ns or (verify and not entry[2]):
            return False, None
        outcome = entry[3]
        return True, ImageInfo(*outcome) if isinstance(outcome, list) else outcome

    def put(self, folder: str, path: str, st: os.stat_result, verify: bool, outcome: Outcome) -> None:
        if self.root is None or outcome is None:
            return
        value = [outcome.width, outcome.height, outcome.mode, outcome.format, outcome.orientation] \
            if isinstance(outcome, ImageInfo) else outcome
        self._folder(folder)[os.path.abspath(path)] = [st.st_size, st.st_mtime_ns, verify, value]
        self._changed.add(folder)

    def save(self) -> None:
        """Writes the folders that changed (atomically: a temporary file renamed over the old one)."""
        if self.root is None:
            return
        for folder in sorted(self._changed):
            target = self._file(folder)
            try:
                os.makedirs(self.root, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix='.tmp-', suffix='.json')
                with os.fdopen(fd, 'w', encoding='utf-8') as f:
                    json.dump({'version': CACHE_VERSION, 'folder': os.path.abspath(folder),
                               'entries': self._entries[folder]}, f)
                os.replace(tmp, target)
            except OSError as err:
                logger.warning('data check: cannot write the cache %s (%s); the next check starts cold (set %s '
                               'to a writable folder, or to off)', target, err, CACHE_ENV)
                return
        self._changed.clear()


def _probe(path: str, verify: bool) -> Outcome:
    try:
        return probe_image(path, verify)
    except BadPairError as err:
        return str(err)


def probe_files(paths: dict[str, str], verify: bool = True, workers: Optional[int] = None,
                cache: Optional[ProbeCache] = None) -> tuple[dict[str, Outcome], int]:
    """Outcome of every file of `paths` ({path: the image folder it belongs to}) and how many came from the cache.

    A missing path gives None, one that is not a regular file its message; the rest are probed in parallel.
    """
    cache = cache or ProbeCache(None)
    outcomes: dict[str, Outcome] = {}
    todo, hits = [], 0
    for path, folder in paths.items():
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            outcomes[path] = None
            continue
        except OSError as err:
            outcomes[path] = f'{path}: cannot be read ({err.strerror})'
            continue
        if not stat.S_ISREG(st.st_mode):
            outcomes[path] = f'{path}: is not a regular file (a folder?)'
            continue
        found, outcome = cache.get(folder, path, st, verify)
        if found:
            outcomes[path] = outcome
            hits += 1
        else:
            todo.append((path, folder, st))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for (path, folder, st), outcome in zip(todo, pool.map(lambda item: _probe(item[0], verify), todo)):
            outcomes[path] = outcome
            cache.put(folder, path, st, verify, outcome)
    cache.save()
    return outcomes, hits


@dataclass
class SplitCheck:
    """The verdict on one split: normalised annotations (with the files' sizes), bad pairs, problems, timing."""
    split: str
    annotation_file: str
    rgb_dir: str
    ir_dir: str
    annotations: Optional[NormalisedAnnotations] = None
    bad_pairs: dict = field(default_factory=dict)  # {int image id: one-line message}
    problems: ProblemLog = field(default_factory=ProblemLog)
    num_pairs: int = 0
    num_files: int = 0
    num_cached: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """No annotation error and no bad pair (clipped boxes and notes are fine)."""
        return not self.problems.kinds(ERROR, BAD_PAIR)

    def header(self) -> str:
        if self.annotations is None:
            return f'{self.split}: not checked'
        boxes = len(self.annotations.dataset['annotations'])
        return (f'{self.split}: {self.annotation_file} ({self.num_pairs} pairs, {boxes} boxes; images in '
                f'{self.rgb_dir} and {self.ir_dir}); {self.num_files} files checked in {self.seconds:.1f} s, '
                f'{self.num_cached} from the cache')

    def report_lines(self) -> list[str]:
        """The header, then one line per problem kind, worst severity first."""
        lines = [self.header()]
        for severity in SEVERITIES:
            lines += [f'  {severity:<8}  {self.problems.summary(kind)}' for kind in self.problems.kinds(severity)]
        if len(lines) == 1:
            lines.append('  no problems')
        return lines


def _pair_problem(names: tuple[str, str], paths: tuple[str, str], outcomes: tuple[Outcome, Outcome]
                  ) -> tuple[str, str, str] | None:
    """(kind, short ref, message) when the two files of a pair cannot be used together, else None."""
    (rgb_name, ir_name), (rgb_path, ir_path), (rgb, ir) = names, paths, outcomes
    if rgb is None and ir is None:
        return 'missing_file', f'RGB+IR {rgb_name}', f'{rgb_path} and {ir_path}: both files missing'
    if rgb is None or ir is None:
        ref, absent, partner = (f'RGB {rgb_name}', rgb_path, ir_path) if rgb is None else \
            (f'IR {ir_name}', ir_path, rgb_path)
        return 'missing_file', ref, f'{absent}: missing partner of {partner}'
    for modality, name, outcome in (('RGB', rgb_name, rgb), ('IR', ir_name, ir)):
        if isinstance(outcome, str):
            return 'unreadable_image', f'{modality} {name}', outcome
    if rgb.size != ir.size:
        turned = [f'{modality} by EXIF orientation {o.orientation}' for modality, o in (('RGB', rgb), ('IR', ir))
                  if o.orientation != 1]
        note = f' (after turning the {" and the ".join(turned)})' if turned else ''
        return 'size_mismatch', ir_name, (f'{rgb_path} is {rgb.width}x{rgb.height} but its IR partner {ir_path} is '
                                          f'{ir.width}x{ir.height} (WxH){note}; the pair must be registered to one '
                                          f'size')
    return None


def _declared_size_problem(image: dict, original_id, annotation_file: str, ir_path: str, ir: ImageInfo) -> str | None:
    declared = image.get('width'), image.get('height')
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in declared):
        return None  # absent (taken from the file) or malformed (an annotation error of its own)
    if (declared[0], declared[1]) == ir.size:
        return None
    turned = ''
    if ir.orientation != 1 and (declared[1], declared[0]) == ir.size:
        turned = f' after EXIF orientation {ir.orientation}; the JSON gives the stored, unturned size'
    return (f'{annotation_file}: image {original_id!r} declares {declared[0]}x{declared[1]} (WxH) but {ir_path} is '
            f'{ir.width}x{ir.height}{turned}; fix width/height (and the boxes, if they were drawn for another size)')


def check_split(split: str, rgb_dir: str, ir_dir: str, annotation_file: str, num_classes: int,
                pair_names: PairNames, verify: bool = True, workers: Optional[int] = None,
                cache: Optional[ProbeCache] = None) -> SplitCheck:
    """Checks one split (module docstring). A file-level annotation error raises DataError; everything else is
    recorded in the returned SplitCheck."""
    start = time.perf_counter()
    result = SplitCheck(split, annotation_file, rgb_dir, ir_dir)
    raw = read_annotation_file(annotation_file)
    check_top_level(raw, annotation_file)
    images, id_map = normalise_images(raw['images'], annotation_file, pair_names)
    original = original_image_ids(images, id_map)
    names = {image['id']: pair_names(image) for image in images}
    paths = {i: (os.path.join(rgb_dir, rgb_name), os.path.join(ir_dir, ir_name)) for i, (rgb_name, ir_name) in
             names.items()}
    files = {path: folder for rgb_path, ir_path in paths.values()
             for path, folder in ((rgb_path, rgb_dir), (ir_path, ir_dir))}
    outcomes, result.num_cached = probe_files(files, verify, workers, cache or ProbeCache(default_cache_root()))
    sizes = {}
    for image in images:
        image_id = image['id']
        pair_outcomes = outcomes[paths[image_id][0]], outcomes[paths[image_id][1]]
        problem = _pair_problem(names[image_id], paths[image_id], pair_outcomes)
        if problem is None:
            declared = _declared_size_problem(image, original[image_id], annotation_file, paths[image_id][1],
                                              pair_outcomes[1])
            problem = ('json_size_mismatch', f'image {original[image_id]!r}', declared) if declared else None
        if problem is not None:
            result.bad_pairs[image_id] = problem[2]
            result.problems.add(*problem)
            continue
        sizes[image_id] = pair_outcomes[1].size
        for name, info in zip(names[image_id], pair_outcomes):
            if info.orientation != 1:
                result.problems.add('exif_rotated', f'{name} (orientation {info.orientation})')
            if is_high_bit_depth(info.mode):
                result.problems.add('high_bit_depth', f'{name} ({info.mode})')
    result.annotations = normalise_annotations(raw, annotation_file, num_classes, pair_names, sizes)
    result.problems.extend(result.annotations.problems)
    result.num_pairs, result.num_files = len(images), len(files)
    result.seconds = time.perf_counter() - start
    return result


def check_dataset(dataset, split: str, verify: bool = True, workers: Optional[int] = None) -> SplitCheck:
    """check_split over a PairedCocoDataset's folders, annotation file, classes and pair naming."""
    return check_split(split, dataset.rgb_dir, dataset.ir_dir, dataset.annotation_file, dataset.num_classes,
                       dataset.pair_names, verify, workers)


def apply_check(check: SplitCheck, dataset) -> None:
    """Logs the check of one split and hands its verdict to the dataset (`use_check`); DataError if it cannot run.

    Bad pairs are left out when the dataset skips bad pairs (a training set with `skip_bad_pairs`), else the
    first one and their count end the run.
    """
    check.annotations.raise_errors()
    logger.info('data check: %s', check.header())
    if check.bad_pairs and not dataset.skip_bad_pairs:
        first = check.problems.first(BAD_PAIR).message
        advice = 'evaluation never skips a pair' if check.split != 'train' else \
            'fix the data, or set skip_bad_pairs=True to leave bad training pairs out'
        raise DataError(f'{len(check.bad_pairs)} unusable pair(s) in the {check.split} split '
                        f'({check.annotation_file}), first: {first}; {advice}; python tools/check_dataset.py lists '
                        f'them all')
    for kind in check.problems.kinds(BAD_PAIR):
        logger.warning('data check: %s split: left out before training (skip_bad_pairs=True): %s', check.split,
                       check.problems.summary(kind))
    for kind in check.problems.kinds(FIXED):
        logger.warning('data check: %s split: %s (in the training targets and the evaluation ground truth alike)',
                       check.split, check.problems.summary(kind))
    for kind in check.problems.kinds(NOTE):
        logger.info('data check: %s split: %s', check.split, check.problems.summary(kind))
    dataset.use_check(check.annotations, check.bad_pairs)
    if check.bad_pairs:
        logger.warning('data check: %s split: %d of %d pairs left out, %d remain', check.split, len(check.bad_pairs),
                       check.num_pairs, len(dataset))


def check_before_training(datasets: dict, workers: Optional[int] = None) -> None:
    """Checks every split ({'train': dataset, 'val': dataset}) before the first training step, on rank 0.

    Under torchrun, rank 0 runs the check and every rank receives its result, so all ranks leave out the same
    pairs, or all raise the same DataError (or rank 0 re-raises its own failure, the others a DataError saying
    so): no rank waits for one that has stopped.
    """
    outcome, failure = None, None
    if dist.is_main_process():
        try:
            outcome = {split: check_dataset(dataset, split, workers=workers) for split, dataset in datasets.items()}
        except UserError as err:
            outcome = err
        except BaseException as err:  # a programming error keeps its traceback on rank 0
            failure, outcome = err, DataError('the data check failed on rank 0; see its traceback')
    outcome = dist.all_gather(outcome)[0]
    if failure is not None:
        raise failure
    if isinstance(outcome, BaseException):
        raise outcome
    for split, dataset in datasets.items():
        apply_check(outcome[split], dataset)
