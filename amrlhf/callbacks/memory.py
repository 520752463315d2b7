"""Large buffers given back to the operating system as soon as they are freed (glibc), for a lower peak resident
set on a CPU: `amrlhf.memory.map_large_allocations` applied when the trainer sets up. docs/performance.md has what
it saves and costs."""

from __future__ import annotations

import logging

import lightning as L

from amrlhf.errors import ConfigError
from amrlhf.memory import MMAP_THRESHOLD_MAX, map_large_allocations

log = logging.getLogger(__name__)


class MapLargeAllocations(L.Callback):
    """From the trainer's set-up on, an allocation of at least `threshold_mb` MiB that the heap's free memory cannot
    serve gets a mapping of its own, unmapped when freed, instead of growing the heap, whose freed memory the
    allocator keeps. No value computed changes; each such buffer's pages are faulted in afresh (a rollout's
    generation is exempt: `amrlhf.memory.heap_allocations`). The setting is the process's. A no-op where the C
    library is not glibc (logged). In a study, whose cells share one process, it stays for every later cell (glibc
    cannot return to its own growing threshold). docs/performance.md: what it saves and costs, by threshold."""

    def __init__(self, threshold_mb: float = 1.0):
        """
        Args:
            threshold_mb: the smallest allocation given its own mapping, in MiB (at most 32: glibc's documented
                maximum, and the cap of its own growth of the threshold).
        """
        self.threshold = int(threshold_mb * (1 << 20))
        if not 0 < self.threshold <= MMAP_THRESHOLD_MAX:
            raise ConfigError(f"MapLargeAllocations: threshold_mb is above 0 and at most {MMAP_THRESHOLD_MAX >> 20}; "
                             f"got {threshold_mb}")
        self.applied: bool | None = None  # after set-up: whether glibc took the setting

    def setup(self, trainer, pl_module, stage: str) -> None:
        # set in every set-up (cheap, the same value): a callback pickled into a new process sets it there too
        applied = map_large_allocations(self.threshold)
        if applied != self.applied:
            if applied:
                log.info("allocations of %.2f MiB or more that the heap cannot serve get a mapping of their own, "
                         "given back when freed", self.threshold / (1 << 20))
            else:
                log.info("MapLargeAllocations: the C library is not glibc (or refused the setting); allocations "
                         "unchanged")
        self.applied = applied
