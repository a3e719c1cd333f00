"""Host arrays to the device without making the device's queue drain first."""

from __future__ import annotations

import numpy as np
import torch


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``. On CUDA through pinned memory and a non-blocking copy: a
    copy from pageable memory would wait until every kernel queued before it has run."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
