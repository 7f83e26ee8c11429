"""Per-step scalars to ``<run_dir>/stats.jsonl`` (one JSON object per line), plus tensorboard through accelerate.

Keys are namespaced (``loss/dm``, ``time/step_s``, ``mem/peak_gb``). Each line is flushed as it is written, so a
killed run loses at most the line being written; on resume, lines past the resumed step are dropped so the curves
do not hold a step twice.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crossdistill.config import atomic_write_text

logger = logging.getLogger(__name__)

STATS_FILE = "stats.jsonl"


def read_stats(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a stats.jsonl (a file or the run dir holding it); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the line being written when a process was killed can be torn
    return rows


def tracker_kwargs(run_dir: str | os.PathLike, tensorboard: bool) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator(...)`` that turn on tensorboard if asked for and installed.

    Then call ``accelerator.init_trackers("tensorboard")`` and pass the accelerator to :class:`StatsLogger`.
    """
    if not tensorboard:
        return {}
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        logger.warning("tensorboard logging is off: the package is not installed (pip install tensorboard)")
        return {}
    return {"log_with": "tensorboard", "project_dir": str(run_dir)}


class StatsLogger:
    """Append one line of scalars per logged step to ``<run_dir>/stats.jsonl``.

    ``resume_step`` is the step a run resumes from (0 for a fresh run): existing lines with a larger step are
    removed first. With an ``accelerator``, only the main process writes, and the scalars also go to its
    trackers (tensorboard, wandb) if it has any.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int = 0, accelerator: Any = None):
        self.path = Path(run_dir) / STATS_FILE
        self.accelerator = accelerator
        self.main_process = accelerator is None or accelerator.is_main_process
        self._file = None
        if self.main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [row for row in read_stats(self.path) if row.get("step", 0) <= resume_step]
                atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write the scalars of ``step`` (tensors and numpy scalars are converted; non-finite values become null)."""
        values = {k: _scalar(v) for k, v in scalars.items()}
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StatsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scalar(value: Any) -> float | None:
    value = float(value.item() if hasattr(value, "item") else value)
    # JSON has no NaN/inf; null keeps the line valid and marks the step as a non-finite one.
    return value if math.isfinite(value) else None
