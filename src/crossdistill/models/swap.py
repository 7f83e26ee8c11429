"""In-place class swaps: a module keeps its parameters, buffers and state-dict keys and changes only its forward."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def swap_classes(module: nn.Module, eligible: Callable[[nn.Module], bool], new_class: type[nn.Module]) -> int:
    """Give every submodule of ``module`` (itself included) for which ``eligible`` holds the class ``new_class``, in
    place; returns how many. ``new_class`` must share the old class's attributes (a subclass, or its base)."""
    count = 0
    for m in module.modules():
        if eligible(m):
            m.__class__ = new_class
            count += 1
    return count
