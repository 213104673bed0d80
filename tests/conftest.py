import os
import sys

import pytest
import torch

# Generated Triton kernels run on the CPU under the interpreter in tests; it must be set
# before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache carried over from another test."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def temporary_pass(monkeypatch):
    """`temporary_pass(name, cls, codes)` registers a pass for this test only."""
    from memopt.passes import PASSES, register_pass

    def register(name: str, cls: type, codes: tuple[str, ...] = ()) -> type:
        monkeypatch.setitem(PASSES, name, None)  # monkeypatch removes the key afterwards
        del PASSES[name]
        return register_pass(name, codes=codes)(cls)

    return register
