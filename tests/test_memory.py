"""Freed memory given back to the OS (amrlhf.memory, amrlhf.callbacks.MapLargeAllocations): the setting is taken
where the C library is glibc, a no-op elsewhere, and changes no value trained. Run in a subprocess of its own: the
allocator's setting is the process's."""

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys

import pytest

import amrlhf.memory as memory
from amrlhf.callbacks import MapLargeAllocations
from amrlhf.errors import ConfigError

SCRIPT = r"""
import ctypes, ctypes.util, json
import lightning as L
import torch
from amrlhf.callbacks import MapLargeAllocations
from amrlhf.memory import heap_allocations
from amrlhf.data import PreferenceDataModule
from amrlhf.models import ModelSpec
from amrlhf.modules import DPOModule, FrozenReference
from amrlhf.segmenters import SampleWiseSegmenter

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def mapped_once_the_heap_is_used_up(size=2 << 20):
    # bytes glibc maps on their own (mallinfo2's hblkhd) while 2 MiB blocks are held until more than the heap's
    # free memory is held: glibc maps a block only where the heap's free memory cannot serve it
    free, before = libc.mallinfo2().fordblks, libc.mallinfo2().hblkhd
    blocks = []
    while len(blocks) * size <= free + 2 * size:
        blocks.append(libc.malloc(size))
    held = libc.mallinfo2().hblkhd - before
    for block in blocks:
        libc.free(block)
    return held

def fit(callbacks):
    L.seed_everything(0, verbose=False)
    dm = PreferenceDataModule("local:tiny-arith/prefs_train", tokenizer="local:tiny-llama", max_length=64,
                              batch_size=2, shuffle=False)
    module = DPOModule(ModelSpec("local:tiny-llama"), reference=FrozenReference(), segmenter=SampleWiseSegmenter(),
                       lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    return module

libc.free(libc.malloc(16 << 20))  # freeing a 16 MiB mapping raises glibc's own threshold to 16 MiB
out = {"before": mapped_once_the_heap_is_used_up()}
plain = fit([])
callback = MapLargeAllocations(threshold_mb=1)
mapped_fit = fit([callback])
out["applied"], out["after"] = callback.applied, mapped_once_the_heap_is_used_up()
with heap_allocations():  # a generation's KV cache: from the heap again
    out["inside"] = mapped_once_the_heap_is_used_up()
out["after_inside"] = mapped_once_the_heap_is_used_up()
out["same"] = all(torch.equal(a, b) for a, b in zip(plain.parameters(), mapped_fit.parameters(), strict=True))
start = DPOModule(ModelSpec("local:tiny-llama"))
start.configure_model()
trained = dict(plain.named_parameters())
out["trained"] = any(not torch.equal(p, trained["policy." + n]) for n, p in start.policy.named_parameters())
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
                    reason="mallinfo2 (glibc >= 2.33) reads the allocator's state")
def test_large_buffers_are_mapped_once_the_trainer_sets_up_and_nothing_trained_changes(tmp_path):
    """glibc's own threshold grows with each mapping freed; the callback fixes it; `heap_allocations` lifts it for
    its block only. The allocator's own settings from the environment are removed (any of them stops the growth)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    out = json.loads(line[7:])
    assert out["before"] == 0          # glibc's raised threshold: a 2 MiB block came from the heap
    assert out["applied"] is True
    assert out["after"] >= 2 << 20     # mapped on their own (and unmapped when freed)
    assert out["inside"] == 0 and out["after_inside"] >= 2 << 20  # heap_allocations lifts it, then restores it
    assert out["same"] and out["trained"]


def test_where_the_c_library_is_not_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(memory, "_threshold", None)
    monkeypatch.setattr(memory, "_libc_fn", lambda name: False)  # no C library with these functions (macOS, musl)
    assert memory.release_freed_memory() is False
    assert memory.map_large_allocations(1 << 20) is False and memory._threshold is None
    callback = MapLargeAllocations(0.25)
    callback.setup(None, None, "fit")
    assert callback.applied is False
    with memory.heap_allocations():  # nothing fixed: nothing to lift
        pass


def test_heap_allocations_restores_the_threshold_after_an_exception_and_when_nested(monkeypatch):
    calls = []
    fake = {"mallopt": lambda param, value: calls.append((param, value)) or 1, "gnu_get_libc_version": object()}
    monkeypatch.setattr(memory, "_threshold", None)
    monkeypatch.setattr(memory, "_libc_fn", lambda name: fake.get(name, False))
    assert memory.map_large_allocations(1 << 20)
    top = memory.MMAP_THRESHOLD_MAX
    with pytest.raises(RuntimeError), memory.heap_allocations():
        with memory.heap_allocations():
            assert memory._threshold == top
        assert memory._threshold == top  # the inner block restores the outer one's, not the fixed threshold
        raise RuntimeError("generation failed")
    assert memory._threshold == 1 << 20
    assert calls == [(-3, 1 << 20), (-3, top), (-3, top), (-3, top), (-3, 1 << 20)]


@pytest.mark.parametrize("threshold_mb", [0, -1, 33])
def test_a_threshold_glibc_cannot_take_is_refused_at_construction(threshold_mb):
    with pytest.raises(ConfigError, match=f"threshold_mb is above 0 and at most 32; got {threshold_mb}"):
        MapLargeAllocations(threshold_mb)

