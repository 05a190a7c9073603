"""A device named on a command line, checked before any work: a name torch does not know, or an accelerator this
machine does not have, is a ConfigError naming the flag (torch's own errors come from deep inside the first ``.to``)."""

from __future__ import annotations

import torch

from ldm.errors import ConfigError


def parse_device(value: str | torch.device, flag: str = "--device") -> torch.device:
    """``value`` as a torch device that this machine has; ``flag`` names the setting in the error."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"{flag} {str(value)!r} is not a torch device ({str(err).splitlines()[0]}); e.g. cpu, "
                          "cuda, cuda:1") from None
    if device.type in ("cpu", "meta"):
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        raise ConfigError(f"{flag} {device}: this machine has no {device.type} device; use {flag} cpu or leave it "
                          "unset")
    count = getattr(module, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{flag} {device}: this machine has {count} {device.type} device(s), numbered from 0")
    return device
