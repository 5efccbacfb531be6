"""Training state of a model sharded across processes (FSDP), as full tensors on the main process.

Under FSDP every process holds a shard of each parameter and of its optimizer state. The runner's
checkpoints and final files hold *full* tensors, in the same safetensors/JSON format as one
process or DDP writes (``training.checkpoint``), so a checkpoint does not depend on how the run
was sharded. :class:`ShardedState` moves state between the two:

* :meth:`ShardedState.gather` - a collective call (every process must make it): the full,
  unsharded trainable parameters, persistent buffers and optimizer state, offloaded to the CPU of
  the main process (the other processes get empty dicts). It uses
  ``torch.distributed.checkpoint.state_dict.get_state_dict`` with ``full_state_dict=True,
  cpu_offload=True``, which understands FSDP2 (``fully_shard``, DTensor parameters), FSDP1 and
  plain modules, and names tensors by their original names (wrapper prefixes removed).
* :meth:`ShardedState.load` - a collective call: the main process's full tensors are broadcast and
  each process keeps its own shard (``set_model_state_dict`` / ``set_optimizer_state_dict`` with
  ``broadcast_from_rank0=True``), so only the main process reads checkpoint tensors from disk.
* :meth:`ShardedState.full_model` - a plain copy of the model's module tree whose tensors are full
  CPU tensors, for ``TrainTask.save_fn`` on the main process. The tree is copied before sharding
  with meta tensors (no memory); the gathered state is assigned into it at the end.

Optimizer state is exchanged with the checkpoint in ``torch.optim`` numbering (``state.<i>.*``,
``i`` = position in the optimizer's parameter groups): the sharded API keys it by parameter name,
and the names are mapped to positions with the order recorded before sharding.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

# accelerate's names of the distributed types whose model state is sharded across processes.
SHARDED_TYPES = ("FSDP",)
# Sharded types the runner cannot handle: their engines own the optimizer and its state.
UNSUPPORTED_TYPES = ("DEEPSPEED", "MEGATRON_LM")


def distributed_name(distributed_type: Any) -> str:
    """``"FSDP"``, ``"MULTI_GPU"``... from an ``accelerate.DistributedType`` or its name."""
    return str(getattr(distributed_type, "value", distributed_type)).upper()


def is_sharded(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards model state (FSDP1 or FSDP2)."""
    return distributed_name(getattr(accelerator, "distributed_type", "NO")) in SHARDED_TYPES


def fsdp_version(accelerator: Any) -> int | None:
    """The FSDP version (1 or 2) of an FSDP ``accelerator``'s plugin; ``None`` if not FSDP."""
    if not is_sharded(accelerator):
        return None
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def requested_fsdp_version() -> int | None:
    """The FSDP version ``accelerate launch`` asked for (its environment), ``None`` if not FSDP.

    For checks made before an ``Accelerator`` exists (accelerate's default is FSDP1)."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of submodules whose parameters and persistent buffers are meta
    tensors (no memory); every other attribute is shared with the original (shallow copy).

    Made before sharding: ``fully_shard`` changes the original modules in place (class, hooks,
    parameters); the copy keeps the hooks registered so far, in tables of its own. Tied
    parameters stay tied. Non-persistent buffers are shared with the original (they are not
    sharded and not in state dicts)."""
    modules: dict[int, nn.Module] = {}
    tensors: dict[int, torch.Tensor] = {}

    def tensor(t: torch.Tensor | None, param: bool) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in tensors:
            m = _meta_like(t)
            tensors[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if param else m
        return tensors[id(t)]

    def copy_tree(mod: nn.Module) -> nn.Module:
        if id(mod) in modules:
            return modules[id(mod)]
        new = copy.copy(mod)
        modules[id(mod)] = new
        # Own hook tables: hooks that sharding adds to the original later must not reach the copy.
        for k, v in mod.__dict__.items():
            if "hook" in k and isinstance(v, dict):
                new.__dict__[k] = type(v)(v)
        new._parameters = {k: tensor(p, True) for k, p in mod._parameters.items()}
        new._buffers = {k: (b if k in mod._non_persistent_buffers_set else tensor(b, False))
                        for k, b in mod._buffers.items()}
        new._modules = {k: (None if c is None else copy_tree(c)) for k, c in mod._modules.items()}
        return new

    return copy_tree(module)


class ShardedState:
    """Moves full training state between a sharded model (+ optimizer) and the main process.

    Build it *before* ``accelerator.prepare`` (it records the module tree and the optimizer's
    parameter order, which sharding replaces), use it after.

    Args:
        model: the unsharded module, as the trainer built it.
        optimizer: the ``torch.optim`` optimizer over its trainable parameters.
        trainable: name -> parameter of the parameters that train (as the runner selected them).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, trainable: Mapping[str, nn.Parameter]) -> None:
        names = {id(p): n for n, p in trainable.items()}
        self.order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        sd = model.state_dict(keep_vars=True)
        params = {n for n, _ in model.named_parameters()}
        # What a checkpoint holds (as for one process): trainable parameters + persistent buffers.
        self.shapes = {k: tuple(v.shape) for k, v in sd.items() if k in trainable or k not in params}
        self.skeleton = meta_skeleton(model)

    @staticmethod
    def _options(**kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kw)

    def gather(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        """Collective. Returns ``(model_tensors, optimizer_state_dict)`` on the main process, full
        CPU tensors (trainable parameters + persistent buffers; ``torch.optim`` format with integer
        parameter ids); ``({}, {})`` on the other processes."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = self._options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        msd = get_model_state_dict(model, options=opts)
        # Before the first step the optimizer has no state; get_optimizer_state_dict would create
        # it with a zero-gradient step (step count 1), which a resume would then inherit.
        # (Every process has stepped equally often, so all take the same branch.)
        osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer.state else {"state": {}}
        if not msd:  # not the main process: cpu_offload keeps the full tensors on rank 0 only
            return {}, {}
        msd = {k: v for k, v in msd.items() if k in self.shapes}
        index = {n: i for i, n in enumerate(self.order)}
        state = {index[n]: entry for n, entry in osd.get("state", {}).items()}
        # Parameter groups (lr, betas, ...) are the same on every process: take the local ones.
        groups = optimizer.state_dict()["param_groups"]
        return msd, {"state": state, "param_groups": groups}

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective. Every parameter (frozen ones too) and persistent buffer, full, on the main
        process's CPU; ``{}`` elsewhere."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(full_state_dict=True, cpu_offload=True))

    def full_model(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The unsharded module tree holding ``state`` (from :meth:`full_model_state`), on the CPU.

        Tensors missing from ``state`` stay on the meta device (an error if read)."""
        self.skeleton.load_state_dict(dict(state), strict=False, assign=True)
        return self.skeleton

    def check(self, tensors: Mapping[str, torch.Tensor], opt_state: Mapping[str, Any], where: str) -> str | None:
        """Why a checkpoint's tensors do not fit this model (``None`` if they do). Main process."""
        missing = sorted(k for k in self.shapes if k not in tensors)
        unknown = sorted(set(tensors) - set(self.shapes))
        if missing or unknown:
            return f"{where}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unknown[:3]})"
        for k, v in tensors.items():
            if tuple(v.shape) != self.shapes[k]:
                return f"{where}: {k} has shape {tuple(v.shape)}, the model has {self.shapes[k]}"
        ids = {int(i) for i in opt_state.get("state", {})}
        n_groups = len(opt_state.get("param_groups", []))
        if any(i < 0 or i >= len(self.order) for i in ids):
            return f"{where}: optimizer state does not fit this model (parameter ids beyond {len(self.order)})"
        grouped = sum(len(g["params"]) for g in opt_state.get("param_groups", []))
        if grouped != len(self.order) or n_groups == 0:
            return f"{where}: optimizer state does not fit this model ({grouped} parameters in its groups, " \
                   f"{len(self.order)} train now)"
        return None

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor] | None,
             opt_state: Mapping[str, Any] | None, *, with_optimizer_state: bool) -> None:
        """Collective. Load full state held by the main process (``tensors``: trainable parameters
        and buffers; ``opt_state``: ``torch.optim`` format) into every process's shards. The other
        processes pass ``None``. Frozen parameters are left as they are. ``with_optimizer_state``
        (the same on every process): whether the checkpoint holds optimizer state (not before the
        first step); without it the optimizer is left fresh, as it would be at that step."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        opts = self._options(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        msd: dict[str, Any] = {}
        osd: dict[str, Any] = {}
        if tensors is not None and opt_state is not None:
            msd = dict(tensors)
            osd = {
                "state": {self.order[int(i)]: dict(entry) for i, entry in opt_state["state"].items()},
                "param_groups": [{**g, "params": [self.order[int(i)] for i in g["params"]]}
                                 for g in opt_state["param_groups"]],
            }
        # Two calls, not set_state_dict: that one skips the model on processes passing an empty
        # dict, which then miss the main process's broadcast (a hang).
        set_model_state_dict(model, msd, options=opts)
        if with_optimizer_state:
            set_optimizer_state_dict(model, optimizer, osd, options=opts)


def enable_fsdp_on_cpu(accelerator: Any, mixed_precision: str) -> bool:
    """Turn a multi-process CPU ``Accelerator`` into an FSDP one if the launch asked for FSDP.

    ``accelerate launch`` with an FSDP config exports ``ACCELERATE_USE_FSDP=true`` and the plugin
    settings; accelerate 1.x builds the plugin from them but only switches to FSDP on GPU-like
    devices, and on CPU silently runs plain data parallelism instead. torch's FSDP (FSDP2's
    ``fully_shard`` and FSDP1) runs on CPU with gloo, so the sharded path can be exercised
    without GPUs (the tests do); this switches the accelerator's state to FSDP with the plugin
    built from the environment. Returns whether it did.
    """
    import os

    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if distributed_name(accelerator.distributed_type) != "MULTI_CPU":
        return False
    plugin = FullyShardedDataParallelPlugin()
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # Every later AcceleratorState() (made by accelerate's optimizer wrapper, among others) copies
    # the process state's fields over its own: the process state must say FSDP too.
    PartialState().distributed_type = DistributedType.FSDP
    return True


__all__ = ["SHARDED_TYPES", "UNSUPPORTED_TYPES", "ShardedState", "distributed_name", "enable_fsdp_on_cpu",
           "fsdp_version", "is_sharded", "meta_skeleton", "requested_fsdp_version"]
