"""Seeding that makes a resumed run continue the exact trajectory of an uninterrupted one.

edm2-style: every random draw of a training step comes from a generator seeded by a hash of
``(seed, rank, step, stream)``, so step 1234 draws the same noise whether the run got there straight or through
five restarts, and no RNG state needs to survive a crash. The global RNGs (torch, CUDA, numpy, python ``random``)
are still seeded once and stored in checkpoints for code that uses them (dropout, data shuffling).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (ints, strings): stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(
    seed: int, rank: int, step: int, device: str | torch.device = "cpu", stream: str = "default"
) -> torch.Generator:
    """A fresh generator for one training step: same (seed, rank, step, stream) → same draws.

    Use one ``stream`` name per purpose (``"noise"``, ``"timesteps"``, ``"critic"``) so that adding a draw to one
    purpose does not shift the others.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(int(seed), int(rank), int(step), str(stream)))
    return gen


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(derive_seed(seed, "numpy") % (1 << 32))  # numpy takes 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """The global RNG states as a nested dict of tensors and JSON-able values (see :func:`set_rng_state`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned. CUDA states are restored only when the device count matches."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
