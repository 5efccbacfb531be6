"""Build ED Task Vectors from a stage-1 delta file (models/finetune_deltas) instead of a fine-tuned
model folder; the widget order of saved workflows is kept."""
import os

import pytest
import torch

import nodes_harness as h

DELTA = "stage1_delta.safetensors"
PARAMS = dict(a_dyn=0.25, b_dyn=0.75, a_con=1.0, b_con=0.25, drop_rate=0.7, dare_seed=0, scope="all",
              overwrite=False)


@pytest.fixture(scope="module")
def delta_file(nodes_env):
    """The fine-tuned model of the shipped workflows, as a delta against the base (ft - base, fp32)."""
    from safetensors.torch import load_file

    from merging.checkpoint import find_weight_files
    from merging.deltas import save_delta
    from merging.fingerprint import fingerprint_checkpoint

    base, ft = (load_file(find_weight_files(os.path.join(nodes_env.paths[k], "transformer")))
                for k in ("base", "finetuned"))
    folder = os.path.join(nodes_env.models, "finetune_deltas")
    os.makedirs(folder, exist_ok=True)
    return save_delta(os.path.join(folder, DELTA), {k: ft[k].float() - base[k].float() for k in base},
                      name="finetune", base_fingerprint=fingerprint_checkpoint(nodes_env.paths["base"]), overwrite=True)


def test_new_input_is_appended_optional_and_old_widget_order_kept(nodes_env):
    schema = nodes_env.by_id["MotionDialBuildTaskVectors"].define_schema()
    ids = [i.id for i in schema.inputs]
    assert ids == ["base_model", "finetuned_model", "name", "a_dyn", "b_dyn", "a_con", "b_con", "drop_rate",
                   "dare_seed", "scope", "overwrite", "finetuned_delta"]
    last = schema.inputs[-1]
    assert last.optional and last.default == "(none)" and last.options[0] == "(none)"


def test_build_from_a_delta_matches_the_build_from_the_model(nodes_env, delta_file):
    from merging.deltas import load_deltas

    build = nodes_env.by_id["MotionDialBuildTaskVectors"].execute
    opts = nodes_env.by_id["MotionDialBuildTaskVectors"].define_schema().inputs[-1].options
    assert DELTA in opts
    # finetuned_model is ignored when a delta is given (even the base itself)
    tv, sched, text = build(base_model=h.BASE, finetuned_model=h.BASE, name="ed_from_delta",
                            finetuned_delta=DELTA, **PARAMS).args
    assert text.startswith("built:") and sched is not None
    ref = load_deltas(nodes_env.paths["task_vectors"])  # built from the fine-tuned folder with the same parameters
    assert set(tv.deltas) == set(ref) == {"dynamics", "control"}
    for name in ref:
        for k in ref[name]:
            # ft = base + (ft - base) equals ft up to fp32 rounding; DARE masks are the same (same seed)
            torch.testing.assert_close(tv.deltas[name][k].float(), ref[name][k].float(), rtol=0, atol=1e-5)
    again = build(base_model=h.BASE, finetuned_model=h.BASE, name="ed_from_delta", finetuned_delta=DELTA,
                  **PARAMS).args[2]
    assert again.startswith("already built:")
    # without the delta the old behaviour holds: base == finetuned is refused, naming the new input
    with pytest.raises(ValueError, match="finetuned_delta"):
        build(base_model=h.BASE, finetuned_model=h.BASE, name="ed_same", **PARAMS)


def test_delta_for_another_base_is_refused(nodes_env, delta_file):
    with pytest.raises(ValueError, match=DELTA.replace(".", r"\.")):
        nodes_env.by_id["MotionDialBuildTaskVectors"].execute(base_model=h.LOCKED, finetuned_model=h.BASE,
                                                        name="ed_wrong_base", finetuned_delta=DELTA, **PARAMS)
    assert not os.path.exists(os.path.join(nodes_env.models, "task_vectors", "ed_wrong_base"))
