"""How many GPUs (one process each) a GPU test case launches on, as pytest parameters.

    @pytest.mark.parametrize("gpus", GPU_WORLDS)                # 1, 2, 4 and 8 GPUs, TP over all
    @pytest.mark.parametrize("gpus, tp_size", [gpu_case(8, 4, id="8gpu-tp4")])

Each case carries @pytest.mark.gpu(n), which conftest.py turns into a skip naming the count where
fewer GPUs are visible. The counts are those of the boxes tpext is run on (nvidia-h100-x1 and
nvidia-h200: 1; nvidia-h200-x2, -x4, -x8), so on each box every case that fits it runs.
"""
import pytest


def gpu_case(gpus: int, *values, id: str):
    """One parameter set launched on `gpus` GPUs: (gpus, *values)."""
    return pytest.param(gpus, *values, marks=pytest.mark.gpu(gpus), id=id)


def gpu_worlds(*counts: int):
    return [gpu_case(n, id=f"{n}gpu") for n in counts]


GPU_WORLDS = gpu_worlds(1, 2, 4, 8)
