"""Resumable training state: atomic, safetensors-only checkpoints with auto-resume from the latest and pruning.

Layout of one run dir::

    checkpoints/step_000120/          one complete checkpoint (the step count = steps done)
        unet.safetensors              tensors of each saved object's state_dict (module, optimizer, scheduler, ...)
        unet.structure.json           the non-tensor rest of that state_dict (optimizer param_groups, ints, ...)
        rng.safetensors, rng.structure.json   global RNG states (torch, CUDA, numpy, python)
        meta.json                     {"step", "objects", "user": <meta passed to save>}
        COMPLETE                      written last: a dir without it is never loaded
    checkpoints/step_000130.tmp/      a save in progress (or killed mid-way): ignored, removed on the next look

A save writes everything into ``step_N.tmp/``, fsyncs it, then renames it to ``step_N/`` in one atomic step, so a
``kill -9`` or a full disk at any moment leaves the previous checkpoint intact. Nothing here pickles: state_dict
tensors go to safetensors, the rest to JSON, and only those two formats are ever read back.

Works with accelerate: pass the *unwrapped* modules (``accelerator.unwrap_model``) and the optimizers, and let only
the main process save (``CheckpointManager(..., main_process=accelerator.is_main_process)``) while the others call
:meth:`CheckpointManager.gather` on the same objects: under FSDP the states are gathered collectively
(crossdistill.train.sharded).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crossdistill.errors import CrossDistillError
from crossdistill.train.seeding import rng_state, set_rng_state

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_RESERVED = {"rng", "meta"}
_RNG = "rng"


class CheckpointError(CrossDistillError):
    """A checkpoint could not be written (disk full, permissions) or does not hold what is asked of it."""


# ----------------------------------------------------------------------------------------------------------------
# state_dict <-> (tensors for safetensors, structure for JSON)


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, JSON scalars) into flat tensors + a JSON structure.

    Tensors are named by their dotted path (``state.0.exp_avg``), so a module's state_dict keeps its own key names.
    Dicts with non-string keys (optimizer ``state`` is keyed by int) and tuples are tagged so they come back as they
    were. Tensors that share storage (tied weights) are cloned, since safetensors refuses shared tensors.
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two entries of the state map to the tensor name '{path}'")
            t = obj.detach().cpu().contiguous()
            ptr = (str(t.device), t.untyped_storage().data_ptr())
            if ptr in storages and t.numel() > 0:
                t = t.clone()
            storages.add(ptr)
            tensors[path] = t
            return {"__tensor__": path}
        prefix = f"{path}." if path else ""
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: walk(v, prefix + k) for k, v in obj.items()}
            return {"__items__": [[walk(k, "<key>"), walk(v, prefix + str(k))] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v, f"{prefix}{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{prefix}{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store {type(obj).__name__} at '{path}' in a checkpoint (tensors and JSON only)")

    return tensors, walk(state, "")


def unflatten_state(tensors: Mapping[str, torch.Tensor], structure: Any) -> Any:
    """The inverse of :func:`flatten_state`."""
    if isinstance(structure, list):
        return [unflatten_state(tensors, v) for v in structure]
    if not isinstance(structure, dict):
        return structure
    if "__tensor__" in structure:
        return tensors[structure["__tensor__"]]
    if "__tuple__" in structure:
        return tuple(unflatten_state(tensors, v) for v in structure["__tuple__"])
    if "__items__" in structure:
        return {unflatten_state(tensors, k): unflatten_state(tensors, v) for k, v in structure["__items__"]}
    return {k: unflatten_state(tensors, v) for k, v in structure.items()}


# ----------------------------------------------------------------------------------------------------------------
# Durable writes (module-level so tests can make them fail midway)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    _fsync_path(path)


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save, find, load and prune the checkpoints of one run dir (in ``<run_dir>/checkpoints``).

    ``objects`` passed to :meth:`save` and :meth:`load` is one mapping ``name -> thing``, where a thing is an
    ``nn.Module``, an optimizer, an LR scheduler, anything else with ``state_dict()``/``load_state_dict()``, or a
    plain ``dict[str, Tensor]`` (updated in place on load). Pass the same mapping to both.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, *, main_process: bool = True):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep  # how many complete checkpoints to keep (<= 0: all)
        self.main_process = main_process  # only the main process writes or deletes; the others just read

    # -- finding ---------------------------------------------------------------------------------------------------

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first. Dirs without ``COMPLETE`` (and ``.tmp`` dirs) are not checkpoints."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "COMPLETE").is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Leftovers of interrupted saves are removed on the way."""
        self._remove_stale()
        found = self.list()
        return found[-1] if found else None

    def _remove_stale(self) -> None:
        if not self.main_process or not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        """The step number of a checkpoint dir (``step_000120`` → 120)."""
        m = _STEP_DIR.match(Path(path).name)
        if not m:
            raise CheckpointError(f"{path} is not a checkpoint dir (expected a name like step_000120)")
        return int(m.group(1))

    # -- saving ----------------------------------------------------------------------------------------------------

    def save(
        self, step: int, objects: Mapping[str, Any], meta: Mapping[str, Any] | None = None, *, rng: bool = True
    ) -> Path:
        """Write checkpoint ``step_{step:06d}`` atomically and prune old ones; return its path.

        On any failure the partial dir is removed and the previous checkpoints stay as they were; an OSError
        (disk full, permissions) becomes :class:`CheckpointError`, and the caller decides whether to go on.
        """
        if not self.main_process:
            raise RuntimeError("only the main process saves checkpoints (main_process=False)")
        for name in objects:
            if not _NAME.match(name) or name in _RESERVED:
                raise ValueError(f"checkpoint object name {name!r} must match {_NAME.pattern} and not be {_RESERVED}")
        # States first, before any disk work: gathering a sharded state is collective (see gather), so every
        # process passes through the same state_dict calls even when the disk then fails here.
        states = self.gather(objects)
        if rng:
            states[_RNG] = rng_state()
        final = self.root / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, state in states.items():
                tensors, structure = flatten_state(state)
                _write_safetensors(tensors, tmp / f"{name}.safetensors")
                _write_json(structure, tmp / f"{name}.structure.json")
            info = {"format": FORMAT_VERSION, "step": step, "time": time.time(), "objects": sorted(objects)}
            _write_json({**info, "user": dict(meta or {})}, tmp / "meta.json")
            _write_json({"step": step}, tmp / "COMPLETE")  # last: marks everything above as written
            _fsync_path(tmp)
            self._publish(tmp, final)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                prev = self.list()
                kept = f"the previous checkpoint {prev[-1].name} is intact" if prev else "no earlier checkpoint exists"
                raise CheckpointError(f"could not write checkpoint {final} ({err}); {kept}") from err
            raise
        self.prune()
        return final

    @staticmethod
    def gather(objects: Mapping[str, Any]) -> dict[str, Any]:
        """Each object's state, in order. The other processes call this while the main one saves: an FSDP-sharded
        object (crossdistill.train.sharded) gathers its full tensors collectively; for the others it is a cheap
        ``state_dict()`` that is dropped."""
        return {name: _state_of(obj) for name, obj in objects.items()}

    def _publish(self, tmp: Path, final: Path) -> None:
        # Re-saving a step that exists (e.g. an interrupt right after a periodic save): move the old one aside
        # first, so at every instant one complete copy of that step exists (as step_N or, after a crash, not
        # at all but with the older checkpoints untouched).
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep`` complete checkpoints; return the deleted paths."""
        if self.keep <= 0 or not self.main_process:
            return []
        doomed = self.list()[: -self.keep]
        for p in doomed:
            # Rename first so a crash mid-delete leaves a stale '.old' dir, never a step dir missing files.
            trash = p.with_name(p.name + ".old")
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return doomed

    # -- loading ---------------------------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike, objects: Mapping[str, Any], *, rng: bool = True) -> dict[str, Any]:
        """Restore ``objects`` (and the global RNGs) from a complete checkpoint; return its meta plus ``step``."""
        path = Path(path)
        step = self.step_of(path)
        if not (path / "COMPLETE").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no COMPLETE marker); it will not be loaded")
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        missing = [name for name in objects if name not in meta["objects"]]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} holds {', '.join(meta['objects']) or 'nothing'} but not {', '.join(missing)}"
            )
        for name, obj in objects.items():
            _load_state_into(obj, read_state(path, name))
        if rng and (path / f"{_RNG}.safetensors").is_file():
            set_rng_state(read_state(path, _RNG))
        return {**meta["user"], "step": step}


def read_state(path: str | os.PathLike, name: str) -> Any:
    """The state (as saved: a state_dict with CPU tensors) of one object of a checkpoint, without loading it."""
    path = Path(path)
    tensors = load_file(str(path / f"{name}.safetensors"))
    structure = json.loads((path / f"{name}.structure.json").read_text(encoding="utf-8"))
    return unflatten_state(tensors, structure)


def _state_of(obj: Any) -> Any:
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"cannot checkpoint {type(obj).__name__}: it has no state_dict() and is not a dict of tensors")


def _load_state_into(obj: Any, state: Any) -> None:
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
    else:
        obj.clear()
        obj.update(state)
