"""The pack imports the way ComfyUI loads it, and without ComfyUI at all."""
import os
import subprocess
import sys
import textwrap

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, cwd: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the test process already has our packages imported.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_loads_like_comfyui_with_its_own_nodes_module(tmp_path):
    """By file path, under a mangled name, with ComfyUI's top-level `nodes` already imported,
    from a working directory that is not the pack (so the pack is not on sys.path)."""
    r = _run(f"""
        import importlib.util, sys, types, asyncio
        comfy_nodes = types.ModuleType("nodes"); comfy_nodes.IS_COMFY = True
        sys.modules["nodes"] = comfy_nodes
        init = {os.path.join(PACK_DIR, "__init__.py")!r}
        spec = importlib.util.spec_from_file_location("custom_nodes.MotionDial", init,
                                                      submodule_search_locations=[{PACK_DIR!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        assert callable(mod.comfy_entrypoint)
        assert sys.modules["nodes"] is comfy_nodes, "the pack must not shadow ComfyUI's nodes module"
        assert sys.path.index({PACK_DIR!r}) == len(sys.path) - 1, "pack dir must be appended, not prepended"
        import merging, motion, pipelines, families, training, textadapter
        for m in (merging, motion, pipelines, families, training, textadapter):
            assert m.__file__.startswith({PACK_DIR!r}), m.__file__
        print("ok")
    """, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_import_without_comfyui_does_not_import_torch_or_comfy(tmp_path):
    r = _run(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("motiondial", {os.path.join(PACK_DIR, "__init__.py")!r},
                                                      submodule_search_locations=[{PACK_DIR!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        assert "comfy" not in sys.modules and "comfy_api" not in sys.modules
        assert "torch" not in sys.modules, "importing the pack must stay cheap"
        print(mod.__version__)
    """, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0.1.0"


def test_same_named_package_from_another_pack_is_reported(tmp_path):
    """If another pack's `motion` package wins on sys.path, loading fails with a clear message."""
    other = tmp_path / "other_pack"
    (other / "motion").mkdir(parents=True)
    (other / "motion" / "__init__.py").write_text("")
    r = _run(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(other)!r})
        spec = importlib.util.spec_from_file_location("custom_nodes.MotionDial", {os.path.join(PACK_DIR, "__init__.py")!r},
                                                      submodule_search_locations=[{PACK_DIR!r}])
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except ImportError as e:
            print("ERR", e)
    """, cwd=str(tmp_path))
    assert "ERR" in r.stdout, r.stdout + r.stderr
    assert "'motion'" in r.stdout and "other_pack" in r.stdout
