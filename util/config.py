"""The configuration system: Python config files with `_base_` inheritance, typed `--options`, validated keys.

Follows the SLConfig of IDEA-Research/DINO (util/slconfig.py, itself after mmcv's Config): a config is a Python
file whose public module globals are the keys, `_base_ = ['relative.py', ...]` names files merged first, and
the result is an `addict.Dict`. What differs:

- There is one set of known keys: those defined by config/DINO/DINO_4scale.py and its bases. A key outside
  that set, in a file or in the options, is an error that names the key and its closest known keys; so is a
  value whose type does not fit the key's default (an int is accepted where the default is a float and
  becomes a float; a key whose default is None accepts anything). The resolved config must define every
  known key, so a config bases on DINO_4scale.py or is a full dump.
- Values are checked when the config loads, against the one-line-per-key rules of util/config_rules.py
  (ranges, choices, `hidden_dim` a multiple of 32, ...) and its rules across keys (`dn_labelbook_size` vs
  `num_classes`, `num_feature_levels` vs `return_interm_indices`, ...). The error names the file that set the
  value (or `--options`), the key, the value and what it may be.
- A config file that raises while it executes is a ConfigError naming the file and the line.
- Reading a key that is not in the config raises (addict would return an empty Dict silently).
- No `_delete_`, no .json/.yaml configs, no temporary module on disk: the file is executed in a namespace.

Convention for code that reads the config: only `build_model(cfg)`, `build_dataset`, `main.py` and
`engine.py` read it, and they read each key as `cfg.<key>` (e.g. `cfg.hidden_dim`); constructors below them
take plain arguments. tests/test_config.py checks that every known key is read in that form somewhere and
that every `cfg.<key>` read in the code base is a known key.

Options (what `main.py --options a=1 b=[1,2] c=True d=None e=text` gives) are "key=value" strings whose value
is parsed as a Python literal (int, float, bool, None, str, nested lists/tuples/dicts); a value that is not a
literal is taken as a plain string. A dotted key `a.b=1` sets entry `b` of the dict-valued key `a`.
"""
import ast
import copy
import difflib
import functools
import os
import traceback
import types
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from addict import Dict
from yapf.yapflib.yapf_api import FormatCode

from util.config_rules import CROSS_RULES, VALUE_RULES
from util.errors import UserError

KNOWN_KEYS_FILE = Path(__file__).resolve().parents[1] / 'config' / 'DINO' / 'DINO_4scale.py'


class ConfigError(UserError, ValueError):
    """A config file or option that cannot be loaded: unknown key, wrong type, bad `_base_`, bad syntax."""


class Config(Dict):
    """The resolved config: an addict.Dict (read keys as `cfg.key` or `cfg['key']`) that raises on missing keys."""

    def __missing__(self, key):
        raise KeyError(f"config has no key '{key}'{_suggestion(key, self.keys())}")

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(err.args[0]) from None

    def dump(self, path: Union[str, os.PathLike]) -> None:
        """Writes the config as a flat Python file (pep8-formatted with yapf) that `load_config` reads back."""
        lines = ['# CAFF-DINO config resolved and written by util/config.py (bases already merged).']
        for key, value in self.to_dict().items():
            _check_literal(key, value)
            lines.append(f'{key} = {value!r}')
        code, _ = FormatCode('\n'.join(lines) + '\n', style_config='pep8')
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(code)


def load_config(path: Union[str, os.PathLike], options: Optional[Union[Mapping[str, Any], Iterable[str]]] = None
                ) -> Config:
    """Loads the Python config file `path` with its `_base_` chain, applies `options`, validates every key.

    Args:
        path: a .py config file.
        options: a dict {key: value} (dotted keys allowed) or a list of "key=value" strings (see parse_options).
    Returns:
        Config holding every known key.
    Raises:
        ConfigError naming the file (or `--options`) and the key at fault.
    """
    known = known_keys()
    origins: dict[str, str] = {}
    values = _coerce_floats(_resolve(Path(path), known, chain=(), origins=origins), known)
    missing = [key for key in known if key not in values]
    if missing:
        raise ConfigError(f'{path}: missing keys {missing}; base the file on {_display(KNOWN_KEYS_FILE)} '
                          f"(_base_ = ['<relative path>/DINO_4scale.py']) and override only what changes")
    if options:
        if not isinstance(options, Mapping):
            options = parse_options(options)
        _apply_options(values, options, known)
        origins.update({dotted.split('.')[0]: '--options' for dotted in options})
    check_values(values, origins, _display(Path(path)))
    return Config(values)


def config_from_dict(values: Mapping[str, Any], source: str = 'dict') -> Config:
    """A Config from a plain dict (e.g. the one saved in a checkpoint), validated like a config file."""
    known = known_keys()
    _validate(values, known, source)
    values = _coerce_floats(values, known)
    missing = [key for key in known if key not in values]
    if missing:
        raise ConfigError(f'{source}: missing keys {missing}')
    check_values(values, {}, source)
    return Config(values)


def value_fits(key: str, value: Any) -> bool:
    """Whether ``value`` alone may be the value of the known key ``key``: its type fits the key's default and its
    rule in util/config_rules.py holds. Rules across keys are not checked (they need the whole config)."""
    known = known_keys()
    if key not in known:
        return False
    try:
        _validate({key: value}, known, 'value')
    except ConfigError:
        return False
    rule = VALUE_RULES.get(key)
    return rule is None or rule.fits(_coerce(value, known[key]))


def parse_options(items: Optional[Iterable[str]]) -> dict:
    """["a=1", "b=[1, 2]", "c=True", "d=None", "e=text", "f.g=0.5"] -> {'a': 1, 'b': [1, 2], ..., 'f.g': 0.5}.

    None (no --options on the command line) gives {}.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    parsed = {}
    for item in items:
        key, sep, text = item.partition('=')
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--options: '{item}' is not of the form key=value")
        parsed[key] = _parse_value(text.strip())
    return parsed


@functools.lru_cache(maxsize=None)
def _known_keys_cached() -> tuple:
    values = _resolve(KNOWN_KEYS_FILE, known=None, chain=())
    shadowing = sorted(key for key in values if hasattr(Config, key))
    if shadowing:
        raise ConfigError(f'{_display(KNOWN_KEYS_FILE)}: keys {shadowing} shadow Config methods; rename them')
    return tuple(values.items())


def known_keys() -> dict:
    """{key: reference value} of config/DINO/DINO_4scale.py and its bases (read once, then cached)."""
    return copy.deepcopy(dict(_known_keys_cached()))


def _display(path: Path) -> str:
    """`path` relative to the working directory when it is below it, so messages read config/DINO/x.py."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _suggestion(key: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    if not matches:
        return ''
    if len(matches) == 1:
        return f"; did you mean '{matches[0]}'?"
    return '; did you mean ' + ', '.join(f"'{m}'" for m in matches[:-1]) + f" or '{matches[-1]}'?"


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _execute(path: Path) -> tuple[dict, list]:
    """Runs the config file; returns its public values and its `_base_` list."""
    if path.suffix != '.py':
        raise ConfigError(f'{_display(path)}: config files are Python files (.py)')
    if not path.is_file():
        raise ConfigError(f'{_display(path)}: no such config file')
    namespace = {'__file__': str(path), '__name__': '__config__'}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f'{_display(path)}: cannot read the config file ({err}); check the path') from None
    try:
        exec(compile(text, str(path), 'exec'), namespace)
    except SyntaxError as err:
        raise ConfigError(f'{_display(path)}: syntax error at line {err.lineno}: {err.msg}') from None
    except Exception as err:  # the file's own code raised: name the line of the file where it did
        lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if frame.filename == str(path)]
        where = f'line {lines[-1]}' if lines else 'executing it'
        raise ConfigError(f'{_display(path)}: {where} raised {type(err).__name__}: {err}; fix that line') from None
    bases = namespace.get('_base_', [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, tuple)) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f'{_display(path)}: _base_ must be a list of relative file names, got {bases!r}')
    values = {key: value for key, value in namespace.items()
              if not key.startswith('_') and not isinstance(value, (types.ModuleType, types.FunctionType,
                                                                    types.BuiltinFunctionType, type))}
    return values, list(bases)


def _merge(base: dict, override: Mapping) -> dict:
    """`override` on top of `base`; dict values merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _resolve(path: Path, known: Optional[dict], chain: tuple, origins: Optional[dict] = None) -> dict:
    """The values of `path` merged on top of its bases. `known=None` skips validation (used for the known keys).

    `origins`, when given, receives {key: file that set its value} for the merged keys.
    """
    path = path.resolve()
    if path in chain:
        cycle = ' -> '.join(_display(p) for p in chain + (path,))
        raise ConfigError(f'{_display(path)}: _base_ cycle {cycle}')
    values, bases = _execute(path)
    if known is not None:
        _validate(values, known, _display(path))
    merged, origin = {}, {}
    for base in bases:
        base_path = path.parent / base
        base_values = _resolve(base_path, known, chain + (path,), origins)
        for key in base_values:
            if key in origin:
                raise ConfigError(f"{_display(path)}: key '{key}' is defined in two bases, {origin[key]} and "
                                  f'{_display(base_path)}; keep it in one of them')
            origin[key] = _display(base_path)
        merged.update(base_values)
    if origins is not None:
        origins.update({key: _display(path) for key in values})
    return _merge(merged, values)


def check_values(values: Mapping[str, Any], origins: Mapping[str, str], source: str) -> None:
    """Checks the resolved `values` against util/config_rules.py: each key's rule, then the rules across keys.

    Raises ConfigError naming where the value was set (`origins[key]`, else `source`), the key, the value and
    what it may be.
    """
    for key, rule in VALUE_RULES.items():
        if key in values and not rule.fits(values[key]):
            raise ConfigError(f"{origins.get(key, source)}: key '{key}' = {values[key]!r} is not allowed: it must be "
                              f'{rule.requirement}')
    for rule in CROSS_RULES:
        try:
            fits = bool(rule.test(values))
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError):
            fits = False
        if not fits:
            where = ', '.join(dict.fromkeys(origins.get(key, source) for key in rule.keys))
            setting = ', '.join(f'{key}={values.get(key)!r}' for key in rule.keys)
            raise ConfigError(f'{where}: {setting}: {rule.requirement}')


def _validate(values: Mapping, known: Mapping, source: str, prefix: str = '') -> None:
    """Every key must be known and its value must fit the type of the key's default."""
    for key, value in values.items():
        name = prefix + key
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{name}'{_suggestion(key, known.keys())}")
        _check_type(name, value, known[key], source)
        if isinstance(value, Mapping) and isinstance(known[key], Mapping):
            _validate(value, known[key], source, prefix=name + '.')


def _check_type(name: str, value: Any, default: Any, source: str) -> None:
    if default is None:
        return
    if isinstance(default, bool):
        fits = isinstance(value, bool)
    elif isinstance(default, int):
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        fits = isinstance(value, (list, tuple))
    elif isinstance(default, Mapping):
        fits = isinstance(value, Mapping)
    else:
        fits = isinstance(value, type(default))
    if not fits:
        expected = 'list or tuple' if isinstance(default, (list, tuple)) else type(default).__name__
        raise ConfigError(f"{source}: key '{name}' expects a {expected} like its default {default!r}, "
                          f'got {type(value).__name__} {value!r}')


def _coerce(value: Any, default: Any) -> Any:
    """An int given for a float default becomes a float; other values are returned unchanged."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _coerce_floats(values: Mapping, known: Mapping) -> dict:
    """A copy of `values` with ints turned into floats where the known default is a float (one level)."""
    return {key: _coerce(value, known.get(key)) for key, value in values.items()}


def _apply_options(values: dict, options: Mapping[str, Any], known: Mapping) -> None:
    """Sets each (possibly dotted) option key in `values`, checking it against the known keys and defaults."""
    for dotted, value in options.items():
        parts = dotted.split('.')
        target, defaults = values, known
        for depth, part in enumerate(parts):
            name = '.'.join(parts[:depth + 1])
            if part not in defaults:
                raise ConfigError(f"--options: unknown key '{name}'{_suggestion(part, defaults.keys())}")
            if depth == len(parts) - 1:
                _check_type(name, value, defaults[part], '--options')
                target[part] = _coerce(value, defaults[part])
            else:
                if not isinstance(defaults[part], Mapping):
                    raise ConfigError(f"--options: '{name}' is not a dict, so '{dotted}' cannot be set")
                target[part] = dict(target.get(part) or {})
                target, defaults = target[part], defaults[part]


def _check_literal(key: str, value: Any) -> None:
    """Config.dump writes repr(); only values whose repr reads back as the same literal can be dumped."""
    try:
        fits = ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError):
        fits = False
    if not fits:
        raise ConfigError(f"Config.dump: key '{key}' holds {value!r}, which is not a Python literal; "
                          'config values must be numbers, strings, booleans, None, lists, tuples or dicts')
