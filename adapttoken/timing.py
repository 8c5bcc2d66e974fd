"""Stage timing: seconds per stage of a question (decode, vision, group passes, answer...)."""
from __future__ import annotations

import time

import torch


class Timer:
    """Seconds per stage; synchronises CUDA before reading the clock where asked."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float, sync: torch.device | None = None) -> None:
        """Add `seconds` (host time since the stage began, read just before this call) to a stage.
        With `sync`, first wait for the device's queued work and count that wait too, so a stage's
        seconds include the GPU work it launched (not only the time to launch it)."""
        if sync is not None and getattr(sync, "type", None) == "cuda":
            t0 = time.perf_counter()
            torch.cuda.synchronize(sync)
            seconds += time.perf_counter() - t0
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)
