"""Loader nodes: the I2V model, the motion estimator, the motion embedder and the SVD text adapter."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io

from . import host
from . import types as t

CATEGORY = "MotionDial/loaders"

DTYPES = ["auto", "bf16", "fp16", "fp32"]
DEVICES = ["auto", "cpu", "model_offload", "sequential_offload"]
ESTIMATOR_BUILTINS = {"flow (weight-free)": "flow", "ssim (baseline)": "ssim"}
RECORDED_ENCODER = "(recorded in the adapter file)"


@dataclass
class TrainedMotion:
    """What flows on a ``MD_MOTION_EMBEDDER`` wire: ``motion.embedding.load_trained_motion``'s result.

    ``embedder`` is the score embedder; ``weights`` is ``None`` (embedder-only training) or the
    transformer delta trained with it (LoRA/full runs) as a ``merging.patcher.ScheduledWeights``
    named ``"motion"`` at constant weight 1 -- without it the embedder does not match the model.
    """

    embedder: Any
    weights: Any
    path: str
    _checked: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)  # models already checked

    def check_base(self, model: Any) -> None:
        """Refuse (clear error naming the file) a model other than the base the delta was trained on."""
        if self.weights is None or model in self._checked:
            return
        fp = model.fingerprint()
        for delta in self.weights.deltas.values():
            delta.check_base(fp)
        self._checked.add(model)

    def __repr__(self) -> str:
        extra = " + transformer delta" if self.weights is not None else ""
        return f"MotionDial motion embedder{extra} from {self.path!r}"


class LoadI2VModel(io.ComfyNode):
    """Load a diffusers-format image-to-video model (CogVideoX 1.0/1.5 I2V, SVD) from models/diffusers."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialLoadI2VModel",
            display_name="Load I2V Model",
            category=CATEGORY,
            description="Loads a diffusers image-to-video model folder (with model_index.json) from "
                        "models/diffusers, or the pack's bundled demo model (listed first; no download). Only "
                        ".safetensors weights are read.",
            inputs=[
                io.Combo.Input("model_name", options=host.list_diffusers_models(),
                               tooltip="A diffusers model folder inside models/diffusers (CogVideoX-5b-I2V, "
                                       "CogVideoX1.5-5B-I2V, stable-video-diffusion-img2vid-xt ...), or the "
                                       "pack's bundled demo model (a 32-px toy SVD trained on synthetic clips: "
                                       "8 frames, 32x32, cfg 1; use it with the bundled demo embedder)."),
                io.Combo.Input("dtype", options=DTYPES, default="auto",
                               tooltip="Weight precision. auto: bf16 on a GPU, fp32 on the CPU."),
                io.Combo.Input("device", options=DEVICES, default="auto",
                               tooltip="auto: ComfyUI's model management loads the model onto the GPU for a run "
                                       "and offloads it when other models need the memory. model_offload / "
                                       "sequential_offload: diffusers moves components / layers to the GPU only "
                                       "while they run (less VRAM, slower). cpu: run on the CPU."),
                io.Boolean.Input("vae_tiling", default=True,
                                 tooltip="Decode the video in tiles to avoid running out of memory at the end of "
                                         "sampling. SVD's VAE has no tiling: it decodes in slices instead."),
            ],
            outputs=[t.I2VModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str, device: str, vae_tiling: bool) -> io.NodeOutput:
        from families import detect_family
        from pipelines import load_model

        path = host.diffusers_model_path(model_name)
        family = detect_family(path).family.name
        compute = host.torch_device()
        on_cpu = device == "cpu" or getattr(compute, "type", str(compute)) == "cpu"
        if dtype == "auto":
            dtype = "fp32" if on_cpu else "bf16"
        if device in ("model_offload", "sequential_offload") and on_cpu:
            raise ValueError(f"device={device!r} moves weights between the CPU and a GPU, but ComfyUI runs on the "
                             "CPU here. Choose auto or cpu.")
        offload = {"model_offload": "model", "sequential_offload": "sequential"}.get(device, "none")
        # auto: registered with ComfyUI's model manager (also on a CPU-only ComfyUI, where loading
        # is a no-op, so the same code path runs everywhere); the weights wait on the offload
        # device and ManagedI2VModel.prepare() moves them for each run.
        managed = device == "auto"
        where = host.offload_device() if managed else ("cpu" if device == "cpu" else compute)
        svd = family == "svd"
        model = load_model(path, dtype=dtype, device=where, offload=offload,
                           vae_tiling=vae_tiling and not svd, vae_slicing=vae_tiling and svd)
        options = {"dtype": dtype, "device": device, "vae_tiling": vae_tiling}
        return io.NodeOutput(host.ManagedI2VModel.wrap(model, managed, options))


class LoadMotionEstimator(io.ComfyNode):
    """Pick the motion estimator used by Estimate Motion: weight-free optical flow, the SSIM
    baseline, or a trained estimator file from models/motion_estimators."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialLoadMotionEstimator",
            display_name="Load Motion Estimator",
            category=CATEGORY,
            description="Chooses how object and camera motion (1..10) are measured from a clip.",
            inputs=[
                io.Combo.Input("estimator", options=list(ESTIMATOR_BUILTINS) + host.list_model_files("motion_estimators"),
                               default="flow (weight-free)",
                               tooltip="flow: optical flow with a robust camera-motion fit, no weights needed "
                                       "(default). ssim: a frame-difference baseline (one number for both). "
                                       "Other entries: trained estimator files (.safetensors) in "
                                       "models/motion_estimators."),
            ],
            outputs=[t.MotionEstimator.Output(display_name="estimator")],
        )

    @classmethod
    def execute(cls, estimator: str) -> io.NodeOutput:
        if estimator in ESTIMATOR_BUILTINS:
            return io.NodeOutput(ESTIMATOR_BUILTINS[estimator])
        path = host.model_file_path("motion_estimators", estimator)
        from motion.estimate import resolve_estimator  # loads (and checks) a learned estimator file

        return io.NodeOutput(resolve_estimator(path))


def list_motion_embedders() -> list[str]:
    """The bundled demo model's embedder first (when present), then the files in
    models/motion_embedders, minus the transformer deltas kept beside their embedders (a
    ``train_motion`` run folder holds both; only the embedder is picked, it names its delta)."""
    from pipelines.demo import DEMO_EMBEDDER, DEMO_EMBEDDER_LABEL

    out = [DEMO_EMBEDDER_LABEL] if os.path.isfile(DEMO_EMBEDDER) else []
    for name in host.list_model_files("motion_embedders"):
        meta = host.safetensors_metadata(host.model_file_path("motion_embedders", name))
        if meta.get("format") != "motiondial.delta" and name != DEMO_EMBEDDER_LABEL:
            out.append(name)
    return out


def motion_embedder_path(name: str) -> str:
    """File of an entry of ``list_motion_embedders``; a clear error if it is gone."""
    from pipelines.demo import DEMO_EMBEDDER, DEMO_EMBEDDER_LABEL

    if name == DEMO_EMBEDDER_LABEL:
        if not os.path.isfile(DEMO_EMBEDDER):
            raise FileNotFoundError(f"{name!r}: the pack's bundled demo embedder is missing ({DEMO_EMBEDDER}); "
                                    "reinstall MotionDial or pick a file from models/motion_embedders.")
        return DEMO_EMBEDDER
    return host.model_file_path("motion_embedders", name)


class LoadMotionEmbedder(io.ComfyNode):
    """Load a trained motion-score embedder (MotionStone-style) made for the connected model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialLoadMotionEmbedder",
            display_name="Load Motion Embedder",
            category=CATEGORY,
            description="Loads a score embedder (.safetensors from models/motion_embedders) that lets the object "
                        "and camera intensities steer the model. The file records the base model it was trained "
                        "for; another base is refused. A LoRA/full training run also changed the transformer: its "
                        "delta file (named in the embedder's metadata, kept beside it) is loaded too and applied "
                        "by the sampler.",
            inputs=[
                t.I2VModel.Input("model", tooltip="The I2V model the embedder will run on; its "
                                                                 "weights must be the embedder's base."),
                io.Combo.Input("embedder_name", options=list_motion_embedders(),
                               tooltip="A motion embedder file in models/motion_embedders, trained for this model "
                                       "(training.train_motion's motion_embedder.safetensors; keep the "
                                       "transformer delta of a LoRA/full run in the same folder), or the bundled "
                                       "demo embedder (for the bundled demo model only)."),
            ],
            outputs=[t.MotionEmbedder.Output(display_name="embedder")],
        )

    @classmethod
    def execute(cls, model, embedder_name: str) -> io.NodeOutput:
        from motion.embedding import load_trained_motion

        path = motion_embedder_path(embedder_name)
        embedder, weights = load_trained_motion(path, model.model)  # both checked against the model
        trained = TrainedMotion(embedder, weights, path)
        trained._checked.add(model.model)
        return io.NodeOutput(trained)


class LoadTextAdapter(io.ComfyNode):
    """Load an SVD text adapter (ED stage 1) with its CLIP text encoder: the prompt then steers SVD."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MotionDialLoadTextAdapter",
            display_name="Load Text Adapter",
            category=CATEGORY,
            description="Loads a temporal text adapter (.safetensors from models/text_adapters, made by "
                        "training.train_adapter) and the CLIP text encoder it reads prompts with. Connected to the "
                        "I2V Sampler's text_adapter input, it lets the prompt steer Stable Video Diffusion's "
                        "temporal layers. SVD only: CogVideoX reads the prompt itself.",
            inputs=[
                t.I2VModel.Input("model", tooltip="The SVD model the adapter was trained on; another base is "
                                                  "refused."),
                io.Combo.Input("adapter_name", options=host.list_model_files("text_adapters"),
                               tooltip="A text adapter file (text_adapter.safetensors from training.train_adapter) "
                                       "in models/text_adapters."),
                io.Combo.Input("text_encoder", options=[RECORDED_ENCODER] + host.list_text_encoder_folders(),
                               default=RECORDED_ENCODER,
                               tooltip="The CLIP text encoder folder (transformers format, with its tokenizer) in "
                                       "models/text_encoders or models/clip; it must be the one the adapter was "
                                       "trained with. Default: the folder recorded in the adapter file."),
            ],
            outputs=[t.TextControl.Output(display_name="text_adapter")],
        )

    @classmethod
    def execute(cls, model, adapter_name: str, text_encoder: str = RECORDED_ENCODER) -> io.NodeOutput:
        from textadapter import load_text_control

        m = model.model
        if m.family.text_conditioned:
            raise ValueError(f"Load Text Adapter: {m.family.name} already reads the prompt in every block; text "
                             "adapters are for Stable Video Diffusion (remove this node)")
        path = host.model_file_path("text_adapters", adapter_name)
        folder = None if text_encoder == RECORDED_ENCODER else host.text_encoder_path(text_encoder)
        return io.NodeOutput(load_text_control(path, folder, base_fingerprint=m.fingerprint()))


NODES = [LoadI2VModel, LoadMotionEstimator, LoadMotionEmbedder, LoadTextAdapter]
