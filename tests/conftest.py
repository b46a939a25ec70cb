"""Shared fixtures of the pytest suites.

Single-process tests run in the pytest process itself: they must see neither the launcher
variables of an outer torchrun nor state left by another test, so every test starts with them
unset and ends with tpext and torch.distributed torn down (a leak fails the test that leaked).
Multi-process tests go through _dist.launch, whose children get their own environment.
"""
import pytest
import torch
import torch.distributed as dist

import tpext

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def pytest_collection_modifyitems(config, items):
    # @pytest.mark.gpu(n): skip, saying why, where fewer than n GPUs are visible.
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        mark = item.get_closest_marker("gpu")
        if mark is None:
            continue
        need = mark.args[0] if mark.args else 1
        if have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), {have} visible"))


@pytest.fixture(autouse=True)
def clean_process(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    leaked = []
    if tpext.is_initialized():
        leaked.append("tpext is still initialised")
        tpext.destroy()
    if dist.is_initialized():
        leaked.append("a torch.distributed process group is still initialised")
        dist.destroy_process_group()
    if leaked:
        pytest.fail("test left state behind: " + "; ".join(leaked), pytrace=False)
