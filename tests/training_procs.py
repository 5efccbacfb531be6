"""Helpers for tests that run training in child processes (kill, resume, several processes)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def wait_for_checkpoint(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until ``out/checkpoints`` holds a ``step_*`` folder of step ``n`` or later; fail with
    the child's output if it exits first, or after ``timeout`` seconds."""
    t0 = time.time()
    ck = out / "checkpoints"
    while time.time() - t0 < timeout:
        if ck.is_dir() and any(name.startswith("step_") and int(name[5:]) >= n for name in os.listdir(ck)):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")
