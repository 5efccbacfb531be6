"""Streaming task-vector arithmetic over safetensors checkpoints, the ED recipe, schedules.

Modules (import them by name; importing the package itself is free of side effects and does
not import torch):

* ``merging.schedule``: weight of each named delta as a function of the noise level;
* ``merging.fingerprint``: cheap base-model fingerprints and the check that refuses a wrong base;
* ``merging.checkpoint`` / ``merging.safetensors_io``: bounded-memory reading and writing;
* ``merging.ops``: the tensor operations (task vector, scaled sum, extrapolation, DARE, top-k, TIES);
* ``merging.engine``: key-by-key streaming over checkpoints with scopes and atomic sharded output;
* ``merging.recipes``: the ED recipe (dynamics and control deltas) and plain task vectors;
* ``merging.deltas``: the delta file format (``save_delta`` / ``load_delta``);
* ``merging.patcher``: applying scheduled deltas to a live model (used by ``pipelines.sample``);
* CLIs: ``python -m merging.build``, ``python -m merging.inspect``.
"""
