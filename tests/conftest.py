"""Shared test set-up: small thread counts (CI has 2 cores) and deterministic seeds."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no code path may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
