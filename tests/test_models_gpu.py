"""Converted models, the vocab-parallel pieces, sequence parallelism and checkpoints on CUDA
tensors through NCCL (one process per GPU, 1 and 2 GPUs): the native ops path.

The checks are the CPU suites' own (test_convert.py, test_embedding.py, test_attention.py,
test_checkpoint.py), which take the device: the CPU runs prove their logic, these run it on the
GPUs. Covered here: Llama and GPT-2 converted in float32 (logits, greedy generation, one optimizer
step with its gathered gradients and updated weights) and bfloat16 (logits); the embedding, LM
head and vocab-parallel cross-entropy; ParallelTransformerLayer with sequence parallelism against
itself without; a TP 2 checkpoint loaded back at TP 1 (2 GPUs).

Every test skips, saying why, where fewer GPUs are visible. float32 runs with TF32 off (the
references are float32 or float64; TF32 would round the GEMM inputs to 10 mantissa bits).
"""
import os

import pytest
from _dist import launch
from _gpus import GPU_WORLDS
from test_attention import check_layer_sequence_parallel
from test_checkpoint import save_and_reload_body
from test_convert import check_bf16, check_family, for_each_tp_size_on
from test_embedding import run_all as embedding_checks

# Each launch is meant to take well under a minute (imports and NCCL set-up included); the limit
# only turns a hang into a failure.
GPU_TIMEOUT_S = 150.0


def _models_checks(group, device, tag):
    for family in ("llama", "gpt2"):
        check_family(group, device, tag, family, optimizer="adamw" if family == "llama" else "sgd")
    check_bf16(group, device, tag, ("llama", "gpt2"))
    embedding_checks(group, device, tag)
    check_layer_sequence_parallel(group, device, tag, "rmsnorm", "swiglu", 2 * group.size)
    check_layer_sequence_parallel(group, device, tag, "layernorm", "gelu", 3 * group.size)


def models_body():
    world = int(os.environ["WORLD_SIZE"])
    for_each_tp_size_on("nccl", (world,), _models_checks)


@pytest.mark.parametrize("gpus", GPU_WORLDS)
def test_converted_models_on_gpu(gpus):
    launch(models_body, gpus, timeout_s=GPU_TIMEOUT_S)


@pytest.mark.gpu(2)
def test_checkpoint_tp2_to_tp1_on_gpu(tmp_path):
    launch(save_and_reload_body, 2, args=(str(tmp_path), "nccl"), timeout_s=GPU_TIMEOUT_S)
