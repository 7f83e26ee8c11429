"""A small training loop both trainers share: resume → (step → log → sample? → checkpoint?)* → done.

The trainer owns what a step *is* (``step_fn``) and what the state *is* (``objects``: modules, optimizers,
schedulers); this loop owns everything around it, so both trainers resume, log and stop the same way::

    result = train_loop(
        run_dir, max_steps=cfg.train.max_steps, step_fn=step, objects={"unet": unet, "opt": opt},
        checkpoint_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
        sample_every=cfg.sample.every, sample_fn=write_grid, config_hash=config_hash(cfg), guard=guard,
    )

Steps are numbered from 1: ``step_fn(step)`` runs step ``step`` and checkpoint ``step_N`` holds the state after
step N, so a resumed run's next step is N + 1. Draw each step's randomness from
``crossdistill.train.seeding.step_generator(seed, rank, step)`` and a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from crossdistill.train.checkpoint import CheckpointError, CheckpointManager
from crossdistill.train.guard import NonFiniteGuard
from crossdistill.train.stats import StatsLogger

logger = logging.getLogger(__name__)


@dataclass
class LoopResult:
    """What :func:`train_loop` did."""

    step: int  # steps done when the loop returned (max_steps unless it was resumed past it)
    resumed_from: int  # the checkpoint step it started from (0 for a fresh run)
    last_checkpoint: Path | None  # the newest complete checkpoint


def progress_enabled(main_process: bool = True) -> bool:
    """Whether to show progress bars: on the main process, on a terminal, unless CROSSDISTILL_NO_PROGRESS=1."""
    return main_process and sys.stderr.isatty() and os.environ.get("CROSSDISTILL_NO_PROGRESS", "0") != "1"


def train_loop(
    run_dir: str | os.PathLike,
    *,
    max_steps: int,
    step_fn: Callable[[int], Mapping[str, float]],
    objects: Mapping[str, Any],
    checkpoint_every: int,
    keep: int = 3,
    sample_every: int = 0,
    sample_fn: Callable[[int], None] | None = None,
    config_hash: str | None = None,
    guard: NonFiniteGuard | None = None,
    accelerator: Any = None,
    desc: str = "train",
) -> LoopResult:
    """Run steps ``resumed_from + 1 .. max_steps``, resuming from the newest checkpoint of ``run_dir`` if any.

    ``step_fn(step)`` does one optimizer step (use ``guard.check`` inside it to skip non-finite ones) and returns
    namespaced scalars (``{"loss/dm": ...}``); the loop adds ``time/step_s``, ``mem/peak_gb`` (CUDA) and
    ``guard/skipped``. A checkpoint is written every ``checkpoint_every`` steps, at the end, and on Ctrl-C
    (then KeyboardInterrupt is re-raised). ``sample_fn(step)`` runs every ``sample_every`` steps and at the end,
    on every process (gate it on the main process inside if it must run once).
    """
    main = accelerator is None or accelerator.is_main_process
    ckpt = CheckpointManager(run_dir, keep, main_process=main)

    # Resume: the newest complete checkpoint, checked against this run's config.
    start = 0
    latest = ckpt.latest()
    if latest is not None:
        meta = ckpt.load(latest, objects)
        if config_hash and meta.get("config_hash") not in (None, config_hash):
            raise CheckpointError(
                f"{latest} was written by another config (hash {meta['config_hash']}, now {config_hash}); "
                "pass a new --run-dir"
            )
        start = meta["step"]
        logger.info("resuming from %s (step %d)", latest, start)
    last_saved = start

    def save(step: int) -> None:
        nonlocal latest, last_saved
        try:
            if main:
                latest = ckpt.save(step, objects, {"config_hash": config_hash})
            elif accelerator is not None and accelerator.num_processes > 1:
                ckpt.gather(objects)  # the main process's state_dict calls, in step: FSDP's gathers are collective
        finally:
            # Every process must reach the barrier, also when the main one failed to save (or it would hang).
            if accelerator is not None:
                accelerator.wait_for_everyone()
        last_saved = step

    cuda = torch.cuda.is_available() and (accelerator is None or accelerator.device.type == "cuda")
    stats = StatsLogger(run_dir, resume_step=start, accelerator=accelerator)
    bar = tqdm(total=max_steps, initial=start, desc=desc, disable=not progress_enabled(main), dynamic_ncols=True)
    step = start
    try:
        while step < max_steps:
            # One step, timed; its scalars go to stats.jsonl and the progress bar.
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            logs = dict(step_fn(step + 1))
            step += 1
            logs["time/step_s"] = time.perf_counter() - t0
            if cuda:
                logs["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if guard is not None:
                logs["guard/skipped"] = guard.num_skipped
            stats.log(step, logs)
            bar.update(1)
            bar.set_postfix({k.split("/", 1)[-1]: f"{float(v):.4g}" for k, v in logs.items() if k.startswith("loss/")})

            done = step == max_steps
            if sample_fn is not None and ((sample_every > 0 and step % sample_every == 0) or done):
                sample_fn(step)
            if done or (checkpoint_every > 0 and step % checkpoint_every == 0):
                try:
                    save(step)
                except CheckpointError as err:
                    if done:
                        raise
                    # The previous checkpoint is intact; training on keeps the work if the disk frees up.
                    logger.error("%s; training continues and will try again at the next checkpoint", err)
    except KeyboardInterrupt:
        # Keep what is done. An interrupt inside step_fn leaves that step undone: `step` counts finished ones.
        if step > last_saved:
            logger.warning("interrupted: saving a checkpoint at step %d", step)
            save(step)
        raise
    finally:
        bar.close()
        stats.close()
    return LoopResult(step=step, resumed_from=start, last_checkpoint=latest)
