"""The common noise-level scale: 0 = clean, 1 = pure noise.

Schedules (``merging.schedule``) are functions of this level, so one schedule works for every
family:

* discrete-time families (CogVideoX, DDPM/DDIM-style): ``level = t / num_train_timesteps``;
  the ED reference switch "t > 500 of 1000" is ``level > 0.5``.
* EDM families (SVD): the denoiser receives ``c_noise = 0.25 * ln(sigma)``; we map sigma
  log-linearly between the scheduler's ``sigma_min`` and ``sigma_max``:
  ``level = (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min)``, clamped to [0, 1].
  Log-sigma is the axis EDM samplers space their steps on, so "the middle of the schedule" is
  the geometric mean of sigma_min and sigma_max (our choice; nothing published fixes it).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .registry import Family


def _scalar(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        # The CFG batch repeats one timestep; all entries are equal.
        return float(timestep.detach().reshape(-1)[0].float().item())
    return float(timestep)


def noise_level_from_timestep(family: Family, timestep: Any, scheduler_config: Mapping[str, Any]) -> float:
    """Map the timestep a family's denoiser receives onto the common 0..1 noise level.

    Args:
        family: the model family.
        timestep: what the denoiser receives (int step for discrete families, ``0.25*ln(sigma)``
            for SVD); a scalar or a tensor whose entries are equal.
        scheduler_config: the scheduler's config (``num_train_timesteps``, ``sigma_min``,
            ``sigma_max``).
    Returns:
        float in [0, 1].
    """
    t = _scalar(timestep)
    if family.timestep_kind == "discrete":
        n = float(scheduler_config.get("num_train_timesteps", 1000))
        return min(max(t / n, 0.0), 1.0)
    sigma_min = float(scheduler_config.get("sigma_min") or 0.002)
    sigma_max = float(scheduler_config.get("sigma_max") or 700.0)
    log_sigma = 4.0 * t  # c_noise = 0.25 * ln(sigma)
    level = (log_sigma - math.log(sigma_min)) / (math.log(sigma_max) - math.log(sigma_min))
    return min(max(level, 0.0), 1.0)
