"""Count the host <-> device syncs of the training step on CUDA (``--sync-debug``).

PyTorch's sync debug mode warns at every synchronizing CUDA call (``.item()``, blocking copies,
``nonzero``); here those warnings are counted per optimizer step and by source line, so a GPU run
says where the host waited: in our code, in DeepSpeed or in a library tower. Logging and
checkpointing sync on purpose and are left out (``paused``). Off on CPU, where nothing syncs.
"""
from __future__ import annotations

import collections
import contextlib
import warnings

import torch

MESSAGE = "called a synchronizing CUDA operation"


class SyncAudit:
    def __init__(self, enabled: bool, start_step: int = 2):
        self.enabled, self.start_step = enabled and torch.cuda.is_available(), start_step
        self.sites: collections.Counter = collections.Counter()
        self.steps = 0
        self._catcher = self._records = None

    def after_step(self, step: int) -> None:
        """Called after each optimizer step: starts counting after ``start_step`` (warm-up and
        compilation left out), then counts steps."""
        if not self.enabled:
            return
        if self._catcher is None and step >= self.start_step:
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif self._catcher is not None:
            self.steps += 1
            self._drain()

    def _drain(self) -> None:
        for w in self._records:
            if MESSAGE in str(w.message):
                self.sites[f"{w.filename}:{w.lineno}"] += 1
        self._records.clear()

    @contextlib.contextmanager
    def paused(self):
        """Deliberate syncs (logging, checkpoints) are not counted."""
        if self._catcher is None:
            yield
            return
        self._drain()
        torch.cuda.set_sync_debug_mode("default")
        try:
            yield
        finally:
            self._records.clear()
            torch.cuda.set_sync_debug_mode("warn")

    def close(self) -> dict | None:
        """Stop counting; the summary for ``summary.json`` (None when off)."""
        if not self.enabled:
            return None
        if self._catcher is not None:
            self._drain()
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None
        total = sum(self.sites.values())
        return {"steps": self.steps, "syncs_per_step": total / self.steps if self.steps else None,
                "sites": dict(self.sites.most_common(10))}
