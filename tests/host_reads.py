"""Counting host reads in tests: the routes and exits that claim to read nothing (or once) from the device."""

from __future__ import annotations

import contextlib

import pytest
import torch

HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Count every call of a Tensor method that brings device data to the host (and torch.nonzero)."""
    calls: list[str] = []
    patch = pytest.MonkeyPatch()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __original=original, __name=name, **kwargs):
            calls.append(__name)
            return __original(self, *args, **kwargs)

        patch.setattr(torch.Tensor, name, spy)
    original_nonzero = torch.nonzero

    def spy_nonzero(*args, **kwargs):
        calls.append("torch.nonzero")
        return original_nonzero(*args, **kwargs)

    patch.setattr(torch, "nonzero", spy_nonzero)
    try:
        yield calls
    finally:
        patch.undo()
