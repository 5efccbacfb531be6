"""Shared test set-up: small thread counts (CI has 2 cores), offline hub, and the fixtures
several test files use (tiny model folders, the node test environment)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no code path may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Tiny models are overhead-bound: one thread is faster than two on a busy 2-core machine
# (measured ~20x on a loaded machine) and keeps timings stable.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(family="cogvideox-i2v") -> str``, a tiny random diffusers folder.

    Built once per family per test session (``pipelines.tiny.build_tiny_model``, seed 0) and
    shared: tests must treat it as read-only (copy it first to corrupt or edit it).
    """
    from pipelines.tiny import build_tiny_model

    built: dict[str, str] = {}

    def make(family: str = "cogvideox-i2v") -> str:
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp("tiny") / family, family, seed=0)
        return built[family]

    return make


@pytest.fixture(scope="module")
def nodes_env():
    """The node tests' environment (``nodes_harness.env()``: a ComfyUI-like models tree with tiny
    models, the ComfyUI stand-ins and the pack loaded), installed for one test module and the
    stand-ins taken out of ``sys.modules`` after it."""
    import nodes_harness

    e = nodes_harness.env()
    yield e
    e.uninstall()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for every test module (restored after it), even if an earlier module
    or a CLI under test changed it: tiny models only pay for thread synchronisation, ~10-20x
    slower with two threads on a busy 2-core machine. Module-scoped so that module-scoped model
    fixtures are built under it too (autouse fixtures run first within their scope)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """Factory: ``tiny_model(family) -> I2VModel``, ``pipelines.load_model`` of the session's
    tiny folder, loaded once per test module (tests that patch it must restore it)."""
    from pipelines import load_model

    loaded: dict = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_model(tiny_model_dir(family))
        return loaded[family]

    return get


@pytest.fixture(scope="module")
def tiny_cog(tiny_model):
    """The tiny CogVideoX 1.0 I2V model (resolution-locked to 32x32), loaded once per module."""
    return tiny_model("cogvideox-i2v")


@pytest.fixture(scope="module")
def tiny_cog15(tiny_model):
    """The tiny CogVideoX 1.5 I2V model (multiples of 16 px up to 128), loaded once per module."""
    return tiny_model("cogvideox1.5-i2v")


@pytest.fixture(scope="module")
def tiny_svd(tiny_model):
    """The tiny SVD model, loaded once per module."""
    return tiny_model("svd")
