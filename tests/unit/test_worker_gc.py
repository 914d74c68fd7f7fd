"""The worker's cyclic-GC tuning (agents.worker.tune_gc)."""
from __future__ import annotations

import gc

from agents.worker import GC_THRESHOLDS, tune_gc


def test_tune_gc_freezes_the_start_up_heap_and_raises_the_thresholds():
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 50_000  # a batch's live containers fit in the youngest generation
        assert gc.get_freeze_count() > 1000  # modules, classes and functions loaded so far
        # cycles are still collected, just less often
        a: list = []
        a.append(a)
        del a
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
