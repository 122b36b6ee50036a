"""Devices: the one place a device name ("auto", "cpu", "cuda:1") becomes a torch device."""

from __future__ import annotations

import torch

from ganbench.errors import GanbenchError


def resolve_device(device: str) -> torch.device:
    """"auto" → CUDA when present, else CPU; a named device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GanbenchError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N",
                            "device") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise GanbenchError(f"device {device!r} is not available on this machine", "device")
    return dev
