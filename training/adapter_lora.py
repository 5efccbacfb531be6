"""Low-rank fine-tuning by composition, for ED stage 1 (``train_adapter --trainable lora``).

Each selected ``nn.Linear`` gets a forward hook adding ``scale * B(A(x))`` to its output, with
``A [rank, in]`` small random and ``B [out, rank]`` zero, so training starts exactly from the base
model. The model's own modules and state-dict keys are untouched; at the end the update is
folded into a weight delta ``scale * B @ A`` per selected ``<module>.weight`` key, which is what
``merging`` consumes (ED needs ``tau = ft - pre``, not an adapter at sampling time).
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
from torch import nn


def linear_modules(model: nn.Module, key_filter) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` whose ``<name>.weight`` key passes ``key_filter``."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and key_filter(f"{n}.weight")]


class LowRankSet(nn.Module):
    """The low-rank factors for a set of linear layers of one model.

    Args:
        model: the model holding the layers (not registered as a submodule: its weights stay its own).
        names: module names of ``nn.Linear`` layers inside ``model``.
        rank: rank of each update (clamped to the layer's smaller side).
        alpha: the update is scaled by ``alpha / rank`` (LoRA's convention; ``alpha = rank`` -> 1).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], rank: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"low-rank fine-tuning: rank must be positive, got {rank}")
        modules = dict(model.named_modules())
        self.names = list(names)
        if not self.names:
            raise ValueError("low-rank fine-tuning: the chosen scope selects no linear layers")
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self._targets: dict[str, nn.Linear] = {}
        for name in self.names:
            lin = modules.get(name)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"low-rank fine-tuning: {name!r} is not a linear layer of the model")
            r = min(rank, lin.in_features, lin.out_features)
            key = self._key(name)
            w = lin.weight
            down = torch.empty(r, lin.in_features, device=w.device, dtype=torch.float32)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down[key] = nn.Parameter(down)
            self.up[key] = nn.Parameter(torch.zeros(lin.out_features, r, device=w.device, dtype=torch.float32))
            self.scales[key] = float(alpha if alpha is not None else r) / r
            self._targets[key] = lin
        self._handles: list = []

    @staticmethod
    def _key(name: str) -> str:
        # ParameterDict keys may not contain dots.
        return re.sub(r"\.", "__", name)

    def attach(self) -> "LowRankSet":
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return self
        for key, lin in self._targets.items():
            self._handles.append(lin.register_forward_hook(self._hook(key)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            down, up = self.down[key], self.up[key]
            update = nn.functional.linear(nn.functional.linear(x.to(down.dtype), down), up)
            return output + (self.scales[key] * update).to(output.dtype)

        return hook

    @torch.no_grad()
    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": scale * up @ down}`` in fp32 on the CPU: the fine-tune as a task vector."""
        return {
            f"{name}.weight": (self.scales[self._key(name)] * self.up[self._key(name)] @ self.down[self._key(name)]).cpu()
            for name in self.names
        }
