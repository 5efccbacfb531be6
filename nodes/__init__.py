"""MotionDial's ComfyUI nodes (``comfy_api.latest`` schema).

Imported only by the pack's ``comfy_entrypoint`` inside ComfyUI (and by tests with a stand-in for
``comfy_api``). Importing it registers the pack's model folders with ``folder_paths``; the node
modules import the library (torch, diffusers) only when a node runs.

Nodes, by group: loaders (Load I2V Model, Load Motion Estimator, Load Motion Embedder, Load Text
Adapter), motion (Motion Scores, Estimate Motion), ED (Build / Load ED Task Vectors, Motion
Schedule), sampling (I2V Sampler).
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import examples, host, loaders, motion, sampling, schedule, task_vectors

NODES: list[type[io.ComfyNode]] = [
    *loaders.NODES,
    *motion.NODES,
    *task_vectors.NODES,
    *schedule.NODES,
    *sampling.NODES,
]

host.register_model_folders()


class MotionDialExtension(ComfyExtension):
    """What ``comfy_entrypoint`` hands ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Called once when ComfyUI loads the pack (ComfyUI 0.3.64 does not call on_load): the
        # shipped templates name these inputs, so copy them into ComfyUI's input folder.
        examples.install_example_inputs()
        return list(NODES)


__all__ = ["MotionDialExtension", "NODES"]
