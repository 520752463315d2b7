"""Giving freed memory back to the operating system where large buffers die.

glibc's allocator keeps freed heap memory for reuse: after a rollout's generation, the hundreds of MB its KV
cache and logits held stay in the process's resident set (docs/performance.md). Two levers, both no-ops where
there is no glibc (macOS, musl), neither changing any value computed:

- `release_freed_memory()`: `malloc_trim(0)` returns what it can. Called once per rollout, after generation; not
  after every optimizer step, where it cost 12-26% of a CPU DPO step and lowered no peak.
- `map_large_allocations(threshold)`: `mallopt(M_MMAP_THRESHOLD)`. Where its free memory cannot serve a request,
  glibc grows the heap, or, for a request above its mmap threshold, maps the block on its own and unmaps it (gives
  it back) when freed. But it raises that threshold to the size of every such block freed, up to 32 MiB: after a
  few steps of a torch run nearly every activation comes from the heap, and stays resident once freed. A fixed
  threshold keeps large buffers mapped, so memory freed inside a step leaves the resident set at once. Costs page
  faults where a buffer is mapped afresh (docs/performance.md), so `heap_allocations()` lifts it where many medium
  buffers live and die together: a rollout's generation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3            # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20    # the documented maximum on 64-bit, and the cap of glibc's own growth of it
_libc = None
_threshold: int | None = None  # the threshold in force, once map_large_allocations has fixed one


def _libc_fn(name: str):
    """A function of glibc, or False where there is none (or no such function)."""
    global _libc
    if _libc is None:
        found = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(found) if found else False
        except OSError:
            _libc = False
    return (getattr(_libc, name, False) or False) if _libc else False


def release_freed_memory() -> bool:
    """Ask the C allocator to return freed memory to the OS. -> whether it could be asked (glibc)."""
    trim = _libc_fn("malloc_trim")
    if not trim:
        return False
    trim(0)
    return True


def map_large_allocations(threshold: int) -> bool:
    """From now on, an allocation of at least `threshold` bytes that the heap's free memory cannot serve gets a
    mapping of its own, given back to the OS when freed, instead of growing the heap (glibc's M_MMAP_THRESHOLD,
    fixed: its growth with each freed block stops). -> whether it is set (False where there is no glibc). The
    setting is the process's, for every later allocation."""
    if not 0 < threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"an mmap threshold is between 1 byte and {MMAP_THRESHOLD_MAX} bytes; got {threshold}")
    global _threshold
    mallopt = _libc_fn("mallopt")
    if not mallopt or not _libc_fn("gnu_get_libc_version"):  # musl's mallopt does nothing
        return False
    if mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return False
    _threshold = int(threshold)
    return True


@contextmanager
def heap_allocations() -> Iterator[None]:
    """Inside, allocations come from the heap again (glibc's largest threshold): for work of many medium buffers
    that live and die together, such as a generation's KV cache, which would each be faulted in afresh if mapped.
    After it (also after an exception, and in nested blocks), the threshold in force before it. A no-op where
    `map_large_allocations` never fixed one."""
    before = _threshold
    if before is None:
        yield
        return
    map_large_allocations(MMAP_THRESHOLD_MAX)
    try:
        yield
    finally:
        map_large_allocations(before)
