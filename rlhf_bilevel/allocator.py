"""Freed tensors go back to the operating system, so that a step's peak memory is its own.

glibc's malloc serves a block above its mmap threshold (initially 128 KB) with a mapping of
its own, unmapped when the block is freed; but every such free raises the threshold to the
freed block's size, up to 32 MB. After the first training step, most of a step's tensors
(activations and logits of a few MB each) are therefore carved from the heap, whose freed
pages stay resident: the process keeps the high-water of earlier phases and adds the current
one to it. Measured on SmolLM2 (one λ step with gradient checkpointing, 8 rows × 32 tokens):
resident memory 1712 MB at its peak with the dynamic threshold, 1365 MB with it fixed.
Setting the threshold explicitly fixes it (glibc then stops adjusting it). The price: every
large tensor is a fresh mapping, whose pages fault in as they are first written.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # malloc.h
THRESHOLD = 128 * 1024  # glibc's initial value


def return_freed_memory() -> bool:
    """Fixes glibc's mmap threshold for this process; False where the C library has no `mallopt`
    (macOS, musl), which leaves the allocator as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
