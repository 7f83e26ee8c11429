"""Typed run configs: nested keyword-only dataclasses, JSON round-trips, ``--set key=value`` overrides, run dirs.

Every trainer defines its own config as nested ``@dataclass(kw_only=True)`` classes (one comment per field, torchtitan
style) and a dict of *presets*: plain functions returning a whole config. This module is the mechanism they share:

    cfg = config_from_args(args, PRESETS)          # --preset / --config / --set / --print-config
    run_dir = prepare_run_dir(args.run_dir, cfg)    # writes config.json; refuses another run's dir

Values are parsed by the field's annotation (int, float, bool, str, Optional, list, tuple, Literal, nested dataclass),
so ``--set optim.lr=1e-4`` is a float and ``--set data.resolutions=[256,512]`` a list of ints. Anything wrong raises
:class:`~crossdistill.errors.ConfigError` naming the key, what was expected and the closest valid keys.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import fnmatch
import hashlib
import json
import logging
import os
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from crossdistill.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Keys that may change between a run and its resumption without making it another run (fnmatch patterns).
# Raising the step budget, changing how often/what is logged or how many checkpoints are kept does not change the
# trajectory; everything else (model, data, lr, seed, ...) does.
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "train.max_steps",
    "log.*",
    "checkpoint.keep",
    "checkpoint.every",
    "sample.every",
    "run_dir",
)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
_MISSING = object()  # a key absent from one side of a diff, or a field without default


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able nested dicts (tuples become lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], d: Mapping[str, Any], *, _prefix: str = "") -> T:
    """Build ``cls`` from nested dicts. Strict: an unknown key or a value of the wrong type raises ConfigError.

    Keys missing from ``d`` keep the dataclass defaults, so configs saved by an older version still load.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"'{_prefix.rstrip('.') or '<root>'}' must be a mapping of keys, got {type(d).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise ConfigError(_unknown_key_message(_prefix + key, [_prefix + n for n in names]))
    kwargs = {}
    for name in names:
        if name in d:
            kwargs[name] = _coerce(d[name], hints[name], _prefix + name)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default is missing
        raise ConfigError(f"config '{cls.__name__}' is incomplete: {err}") from None


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations left by `from __future__ import annotations`.
    return typing.get_type_hints(cls)


# ----------------------------------------------------------------------------------------------------------------
# Values: one coercion for JSON values (from_dict) and command-line strings (apply_overrides)


def _coerce(value: Any, tp: Any, key: str, text: bool = False) -> Any:
    """Convert ``value`` to the annotated type ``tp``, or raise ConfigError.

    ``text=True`` for command-line strings (``"1e-4"`` may become a float); JSON values must have the right type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            raise ConfigError(f"'{key}' is a group of options; set its fields instead (e.g. '{key}.<field>=...')")
        return from_dict(tp, value, _prefix=key + ".")
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (text and value.strip().lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, text)
            except ConfigError:
                continue  # try the next member of the union
        raise ConfigError(f"'{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or (text and not isinstance(choice, str) and value == str(choice)):
                return choice
        raise ConfigError(f"'{key}' must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        items = _split_list(value, key, tp, text)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"'{key}' expects {len(args)} values ({_type_name(tp)}), got {len(items)}")
            elems = list(args)
        else:
            elems = [args[0] if args else Any] * len(items)
        # Items parsed out of a command-line string are text again; items of a JSON list are typed values.
        out = [_coerce(v, e, f"{key}[{i}]", text and isinstance(v, str)) for i, (v, e) in enumerate(zip(items, elems))]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if text:
            value = _json_or_error(value, key, tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}' expects {_type_name(tp)}, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"'{key}' expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text:
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"'{key}' expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text:
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"'{key}' expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' expects a string, got {value!r}")
    raise ConfigError(f"'{key}' has a type the config system cannot parse: {_type_name(tp)}")


def _split_list(value: Any, key: str, tp: Any, text: bool) -> list[Any]:
    """A list value: JSON lists pass through; strings are JSON (``[1,2]``), bare ``[a,b]``, or ``a,b``."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not text:
        raise ConfigError(f"'{key}' expects {_type_name(tp)}, got {value!r}")
    s = value.strip()
    if s.startswith("["):
        try:
            parsed = json.loads(s)
            if isinstance(parsed, list):
                return parsed
        except json.JSONDecodeError:
            pass  # `[a, b]` with unquoted strings: split by hand below
        if not s.endswith("]"):
            raise ConfigError(f"'{key}' expects {_type_name(tp)} like [1,2], got {value!r}")
        s = s[1:-1]
    return [part.strip() for part in s.split(",") if part.strip()]


def _json_or_error(text: str, key: str, tp: Any) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"'{key}' expects {_type_name(tp)} as JSON, got {text!r}") from None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ----------------------------------------------------------------------------------------------------------------
# Overrides


def flat_keys(cfg_or_cls: Any) -> list[str]:
    """Every settable dotted key of a config (class or instance), e.g. ``['optim.lr', 'train.max_steps', ...]``."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    hints = _hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{f.name}.{k}" for k in flat_keys(hints[f.name])]
        else:
            keys.append(f.name)
    return keys


def _unknown_key_message(key: str, valid: Sequence[str]) -> str:
    # Close matches on the whole dotted key, then on its last part (`lr` -> `optim.lr`).
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k not in close]
    if close:
        return f"unknown key '{key}'; did you mean {' or '.join(repr(c) for c in close[:3])}?"
    return f"unknown key '{key}'; valid keys: {', '.join(valid)}"


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of ``cfg`` with ``["a.b=1", "flag=true", "list=[1,2]", "opt=none"]`` applied in order."""
    cfg = copy.deepcopy(cfg)
    valid = flat_keys(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --set optim.lr=1e-4)")
        *parents, leaf = key.split(".")
        target = cfg
        for part in parents:
            if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
                raise ConfigError(_unknown_key_message(key, valid))
            target = getattr(target, part)
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(_unknown_key_message(key, valid))
        setattr(target, leaf, _coerce(raw, _hints(type(target))[leaf], key, text=True))
    return cfg


def get_key(cfg: Any, key: str) -> Any:
    """The value at a dotted key (``get_key(cfg, "optim.lr")``)."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


# ----------------------------------------------------------------------------------------------------------------
# Files


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that ``path`` holds either its old content or all of the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps_config(cfg: Any) -> str:
    """The config as indented, key-sorted JSON (what config.json holds and --print-config prints)."""
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the config as JSON, atomically."""
    atomic_write_text(path, dumps_config(cfg))


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    """Read a config JSON written by :func:`save_config` (strict, see :func:`from_dict`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON ({err})") from None
    return from_dict(cls, data)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_resume_safe(key: str, resume_safe: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in resume_safe)


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], resume_safe: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring keys matching ``resume_safe`` patterns."""
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k, _MISSING) != fb.get(k, _MISSING) and not _is_resume_safe(k, resume_safe)]


def config_hash(cfg: Any, resume_safe: Sequence[str] = RESUME_SAFE_KEYS) -> str:
    """A short hash of the keys that define the run (resume-safe keys left out): stored in checkpoints."""
    flat = {k: v for k, v in _flatten(to_dict(cfg)).items() if not _is_resume_safe(k, resume_safe)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def prepare_run_dir(
    run_dir: str | os.PathLike,
    cfg: Any,
    *,
    resume: bool = True,
    resume_safe: Sequence[str] = RESUME_SAFE_KEYS,
) -> Path:
    """Create ``run_dir`` and write ``config.json`` in it; never let one run's dir be taken over by another.

    If ``config.json`` exists, the new config must agree with it on every key except ``resume_safe`` patterns
    (then the run resumes, and config.json is updated with e.g. a raised ``train.max_steps``); otherwise
    ConfigError lists the differing keys. With ``resume=False`` an existing run dir is always refused.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if path.exists():
        if not resume:
            raise ConfigError(f"run dir {run_dir} already holds a run; pass a new --run-dir (or allow resuming)")
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            msg = f"run dir {run_dir} has an unreadable config.json ({err}); pass a new --run-dir"
            raise ConfigError(msg) from None
        differ = config_diff(old, to_dict(cfg), resume_safe)
        if differ:
            raise ConfigError(
                f"run dir {run_dir} already holds another run's config (differs in: {', '.join(differ)}); "
                "pass a new --run-dir or --set the same values"
            )
        changed = config_diff(old, to_dict(cfg))
        if changed:
            logger.info("resuming %s with changed resume-safe options: %s", run_dir, ", ".join(changed))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_config_args(parser: argparse.ArgumentParser, presets: Mapping[str, Callable[[], Any]]) -> None:
    """Add ``--preset``, ``--set KEY=VALUE`` (repeatable), ``--config FILE.json`` and ``--print-config``."""
    names = list(presets)
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--preset", choices=names, default=None, help=f"starting config (default: {names[0]})" if names else None
    )
    group.add_argument("--config", metavar="FILE.json", help="starting config from a JSON file (e.g. a run's config)")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option, e.g. --set optim.lr=1e-4 (repeatable; see --print-config for the keys)",
    )
    group.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def config_from_args(args: argparse.Namespace, presets: Mapping[str, Callable[[], Any]]) -> Any:
    """The resolved config: a preset (or --config file), then every --set override in order.

    The trainer prints :func:`dumps_config` and exits when ``args.print_config`` is set.
    """
    if not presets:
        raise ValueError("config_from_args needs at least one preset")
    if args.config and args.preset:
        raise ConfigError("pass either --preset or --config, not both (add --set overrides to either)")
    if args.config:
        cls = type(next(iter(presets.values()))())
        cfg = load_config(cls, args.config)
    else:
        cfg = presets[args.preset or next(iter(presets))]()
    return apply_overrides(cfg, args.overrides or [])


_warned: set[tuple[str, str]] = set()


def warn_ignored(cfg: Any, key: str, reason: str) -> bool:
    """Warn (once) that option ``key`` has no effect because of ``reason``, if the user set it off its default.

    E.g. ``if not cfg.gan.enabled: warn_ignored(cfg, "gan.weight", "gan.enabled is false")``. Returns whether it
    warned. Options left at their defaults are silent: only a value someone chose can be silently lost.
    """
    value = get_key(cfg, key)
    if value == _default_of(type(cfg), key) or (key, reason) in _warned:
        return False
    _warned.add((key, reason))
    logger.warning("option %s=%r is ignored: %s", key, value, reason)
    return True


def _default_of(cls: type, key: str) -> Any:
    *parents, leaf = key.split(".")
    for part in parents:
        cls = _hints(cls)[part]
    field = {f.name: f for f in dataclasses.fields(cls)}[leaf]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _MISSING
