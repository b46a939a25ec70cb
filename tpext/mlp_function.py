"""The GELU MLP's autograd Function on the native path: fc2(gelu(fc1(x))) as one Function, so
that the backward can apply fc1's GELU derivative inside fc2's dgrad GEMM.

Run as two layer Functions, the backward takes three passes over the [tokens, ffn/tp] hidden
activations between the GEMMs: fc2's dgrad writes dh, torch's gelu_backward reads dh and the
pre-activation and writes dpre, then fc1's GEMMs read dpre. Here fc2's dgrad GEMM writes dpre
directly (cuBLASLt's DGELU_BGRAD epilogue reads the saved pre-activation) together with fc1's
bias gradient, so the elementwise pass and its two reads and one write of the hidden size are
gone (Transformer Engine's LayerNormMLP fuses the same way). No communication moves: the forward
all-reduces fc2's output in pieces beside its GEMMs, the backward all-reduces fc1's dx beside
fc1's wgrad GEMM, exactly as the two layers do.

The GELU derivative applies to the full dh; fc2 is row-parallel, so its dgrad needs no
all-reduce and each rank's dh is already complete for its slice of the hidden features.
"""
import torch

from .errors import call_native
from .linear_functions import column_parallel_forward, native_column_backward, row_parallel_forward


class GeluMLPFunction(torch.autograd.Function):
    """apply(input, w1, b1, w2, b2, group, chunks, chunk_by) -> the MLP's output, the same on every
    rank. CUDA tensors of the native dtypes only (tpext.linear_functions.use_native); b1 and b2 may
    be None. Saves what the two layer Functions would: input, w1 and the pre-activation for fc1,
    fc1's output and w2 for fc2."""

    @staticmethod
    def forward(ctx, input, w1, b1, w2, b2, group, chunks, chunk_by):
        h, pre = column_parallel_forward(input, w1, b1, "gelu", True, keep_pre=True)
        out = row_parallel_forward(h, w2, b2, group, chunks, True, chunk_by)
        ctx.save_for_backward(input, w1, pre, h, w2)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad):
        input, w1, pre, h, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        dx = dw1 = db1 = dw2 = db2 = None
        if need_x or need_w1 or need_b1:
            # dpre = (grad · w2) * gelu'(pre) and db1 = its column sums out of fc2's dgrad GEMM;
            # fc2's own dw2 (and db2 in its epilogue) from the wgrad GEMM after it.
            dpre, dw2, db2, db1 = call_native(torch.ops.tpext.linear_backward_dgelu, grad, h, w2, pre, need_b2,
                                              need_b1, need_w2 or need_b2)
            dx, dw1, _ = native_column_backward(dpre, input, w1, ctx.group, need_x, need_w1, False)
        elif need_w2 or need_b2:
            _, dw2, db2 = call_native(torch.ops.tpext.linear_backward, grad, h, w2, need_b2, False, True)
        return (dx, dw1, db1 if need_b1 else None, dw2 if need_w2 else None, db2 if need_b2 else None,
                None, None, None)
