"""ED task-vector nodes: build the dynamics/control deltas from a base and a fine-tuned model,
or load a built set from models/task_vectors."""
from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io, ui

from . import host
from . import types as t

CATEGORY = "MotionDial/ED"
SCOPES = ["all", "temporal"]
NO_DELTA = "(none)"


def list_finetune_deltas() -> list[str]:
    """Delta files (``.safetensors``) in models/finetune_deltas."""
    return host.list_model_files("finetune_deltas")


@dataclass
class TaskVectors:
    """What flows on a ``MD_TASK_VECTORS`` wire: named ``merging.deltas.Delta`` s of one base."""

    deltas: dict[str, Any]
    folder: str
    schedule: Any = None  # the schedule stored with the set (schedule.json), if any
    _checked: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)  # models already checked

    def check_base(self, model: Any) -> None:
        """Refuse (clear error naming the files) unless every delta was built for ``model``'s weights."""
        if model in self._checked:
            return
        fp = model.fingerprint()
        for delta in self.deltas.values():
            delta.check_base(fp)
        self._checked.add(model)

    def __repr__(self) -> str:
        return f"MotionDial task vectors {sorted(self.deltas)} from {self.folder!r}"


def list_task_vector_sets() -> list[str]:
    """Folders under models/task_vectors that hold deltas (``merging.build`` outputs)."""
    import folder_paths

    found: set[str] = set()
    for root in folder_paths.get_folder_paths("task_vectors"):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.startswith(".") or not os.path.isdir(path):  # hidden: a build in progress
                continue
            if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path)):
                found.add(name)
    return sorted(found)


def task_vector_folder(name: str) -> str:
    import folder_paths

    roots = folder_paths.get_folder_paths("task_vectors")
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"task vector set {name!r} was not found in models/task_vectors (searched: "
                            f"{', '.join(roots)}). Build it with Build ED Task Vectors or `python -m merging.build`.")


def load_set(folder: str, model: Any = None) -> TaskVectors:
    from merging.deltas import load_deltas
    from merging.schedule import Schedule

    fp = model.fingerprint() if model is not None else None
    deltas = load_deltas(folder, fp)
    sched_path = os.path.join(folder, "schedule.json")
    schedule = Schedule.load(sched_path) if os.path.isfile(sched_path) else None
    tv = TaskVectors(deltas=deltas, folder=folder, schedule=schedule)
    if model is not None:
        tv._checked.add(model)
    return tv


def _same_build(folder: str, params: dict, base_fp: dict, ft_fp: dict) -> bool:
    """Whether ``folder`` already holds this build: same recipe parameters, same base and
    fine-tuned weights (compared by fingerprint, wherever the model folders are)."""
    from merging.fingerprint import same_weights

    try:
        with open(os.path.join(folder, "recipe.json"), encoding="utf-8") as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    if any(have.get(k) != v for k, v in params.items()):
        return False
    return same_weights(have.get("base_fingerprint") or {}, base_fp) and \
        same_weights(have.get("finetuned_fingerprint") or {}, ft_fp)


class BuildTaskVectors(io.ComfyNode):
    """ED stages 2-3: extrapolate and decouple (base, fine-tuned) into dynamics and control task vectors."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        models = host.list_diffusers_models()
        return io.Schema(
            node_id="MotionDialBuildTaskVectors",
            display_name="Build ED Task Vectors",
            category=CATEGORY,
            description="Builds the ED 'dynamics' and 'control' task vectors from a base I2V model and the same "
                        "model fine-tuned on motion, and saves them to models/task_vectors/<name>. Streams the "
                        "checkpoints key by key (bounded memory). A set that already exists with the same "
                        "inputs is reused.",
            is_output_node=True,
            inputs=[
                io.Combo.Input("base_model", options=models,
                               tooltip="The base I2V model (models/diffusers) the task vectors will be applied to."),
                io.Combo.Input("finetuned_model", options=models,
                               tooltip="The same model after motion fine-tuning (ED stage 1), same architecture."),
                io.String.Input("name", default="ed_task_vectors",
                                tooltip="Folder name under models/task_vectors for the result (letters, digits, "
                                        "- _ . only)."),
                io.Float.Input("a_dyn", default=0.25, min=0.0, max=4.0, step=0.05,
                               tooltip="Extrapolation: ext = base + a_dyn * (base - finetuned) (ED: 0.25)."),
                io.Float.Input("b_dyn", default=0.75, min=0.0, max=4.0, step=0.05,
                               tooltip="Dynamics: base + b_dyn * DARE(ext - base) (ED: 0.75)."),
                io.Float.Input("a_con", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Control: a_con * finetuned + b_con * DARE(finetuned - base) (ED: 1.0)."),
                io.Float.Input("b_con", default=0.25, min=0.0, max=4.0, step=0.05,
                               tooltip="Control: weight of the DARE-sparsified task vector (ED: 0.25)."),
                io.Float.Input("drop_rate", default=0.7, min=0.0, max=0.99, step=0.01,
                               tooltip="DARE drop probability p; survivors are scaled by 1/(1-p) (ED: 0.7). "
                                       "1-D tensors are never dropped."),
                io.Int.Input("dare_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the DARE masks: same seed = same task vectors. (Not called 'seed': ComfyUI's frontend would add a randomize control.)"),
                io.Combo.Input("scope", options=SCOPES, default="all",
                               tooltip="all: every denoiser weight (the ED reference). temporal: only the "
                                       "family's temporal layers."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing set of this name built from other inputs."),
                # appended last and optional: workflows saved before it keep their widget order
                io.Combo.Input("finetuned_delta", options=[NO_DELTA] + list_finetune_deltas(), default=NO_DELTA,
                               optional=True,
                               tooltip="Instead of finetuned_model: a stage-1 delta file (motiondial.delta, e.g. "
                                       "train_adapter's finetune_delta.safetensors) in models/finetune_deltas; the "
                                       "fine-tuned model is base + delta. (none): use finetuned_model."),
            ],
            outputs=[t.TaskVectors.Output(display_name="task_vectors"),
                     t.Schedule.Output(display_name="schedule",
                                       tooltip="The ED reference schedule saved with the set."),
                     io.String.Output(display_name="summary", tooltip="Where the set was written (or found).")],
        )

    @classmethod
    def execute(cls, base_model: str, finetuned_model: str, name: str, a_dyn: float, b_dyn: float, a_con: float,
                b_con: float, drop_rate: float, dare_seed: int, scope: str, overwrite: bool,
                finetuned_delta: str = NO_DELTA) -> io.NodeOutput:
        from merging.fingerprint import fingerprint_checkpoint, fingerprint_with_delta
        from merging.recipes import build_ed

        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise ValueError(f"Build ED Task Vectors: name {name!r} must be a plain folder name (letters, digits, "
                             "- _ . ; not starting with a dot)")
        base = host.diffusers_model_path(base_model)
        if finetuned_delta and finetuned_delta != NO_DELTA:
            # ft = base + delta; build_ed checks the delta was made for this base
            ft = host.model_file_path("finetune_deltas", finetuned_delta)
            ft_fingerprint = lambda: fingerprint_with_delta(base, ft)  # noqa: E731
        else:
            if base_model == finetuned_model:
                raise ValueError("Build ED Task Vectors: base_model and finetuned_model are the same folder; the "
                                 "task vector would be zero. Pick the motion fine-tuned model as finetuned_model, "
                                 "or a stage-1 delta as finetuned_delta.")
            ft = host.diffusers_model_path(finetuned_model)
            ft_fingerprint = lambda: fingerprint_checkpoint(ft)  # noqa: E731
        os.makedirs(host.model_folder("task_vectors"), exist_ok=True)
        out_dir = os.path.join(host.model_folder("task_vectors"), name)
        params = {"a_dyn": a_dyn, "b_dyn": b_dyn, "a_con": a_con, "b_con": b_con, "p": drop_rate}
        same = {"recipe": "ed", "params": params, "seed": dare_seed, "scope": scope}
        if os.path.isdir(out_dir) and _same_build(out_dir, same, fingerprint_checkpoint(base), ft_fingerprint()):
            status = "already built"
        else:
            if os.path.exists(out_dir) and not overwrite:
                raise FileExistsError(f"Build ED Task Vectors: {out_dir} already exists and was built from other "
                                      "inputs; choose another name or turn on overwrite.")
            # the engine writes into a hidden temporary folder and renames it when complete
            build_ed(base, ft, out_dir, seed=dare_seed, scope=scope, overwrite=overwrite,
                     progress=host.progress_callback(1), **{k: params[k] for k in params})
            status = "built"
        tv = load_set(out_dir)
        text = f"{status}: {out_dir} ({', '.join(sorted(tv.deltas))})"
        return io.NodeOutput(tv, tv.schedule, text, ui=ui.PreviewText(text))


class LoadTaskVectors(io.ComfyNode):
    """Load a built ED task-vector set (dynamics, control) from models/task_vectors."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialLoadTaskVectors",
            display_name="Load ED Task Vectors",
            category=CATEGORY,
            description="Loads a task-vector set (a folder in models/task_vectors made by Build ED Task Vectors or "
                        "`python -m merging.build --recipe ed`). It must have been built for the connected model.",
            inputs=[
                t.I2VModel.Input("model", tooltip="The model the task vectors will be applied to; must be their base."),
                io.Combo.Input("task_vectors_name", options=list_task_vector_sets(),
                               tooltip="A folder in models/task_vectors holding dynamics/control deltas."),
            ],
            outputs=[t.TaskVectors.Output(display_name="task_vectors"),
                     t.Schedule.Output(display_name="schedule",
                                       tooltip="The schedule saved with the set (the ED reference hard switch).")],
        )

    @classmethod
    def execute(cls, model, task_vectors_name: str) -> io.NodeOutput:
        tv = load_set(task_vector_folder(task_vectors_name), model.model)
        return io.NodeOutput(tv, tv.schedule)


NODES = [BuildTaskVectors, LoadTaskVectors]
