"""Exception types. The native ones come from tpext._C; every one subclasses RuntimeError, except
bad arguments, which raise ValueError (or TypeError) naming the argument."""
import torch

from ._C import CommDestroyed, CommTimeout, CudaError, InvalidArgument, NcclError, TpextError

__all__ = ["TpextError", "NcclError", "CudaError", "CommTimeout", "CommDestroyed", "InvalidArgument"]


# What each core exception type puts in its message. A core error raised inside a torch op reaches
# Python as a plain RuntimeError (the dispatcher retypes every C++ exception), so the ops' callers
# give it its tpext type back from these markers. Timeout first: a communicator aborted by the
# watchdog for an NCCL error says "tpext NCCL error", one aborted for a timeout "tpext timeout".
_NATIVE_MARKERS = (
    ("tpext timeout", CommTimeout),
    ("tpext NCCL error", NcclError),
    ("tpext CUDA error", CudaError),
    ("the communicator was destroyed or aborted", CommDestroyed),
)


def native_error(error: BaseException):
    """The tpext exception (CommTimeout, NcclError, CudaError, CommDestroyed) that `error`, a
    RuntimeError out of a tpext torch op, stands for, with the same message; None for any other."""
    if not isinstance(error, RuntimeError) or isinstance(error, TpextError):
        return None
    text = str(error)
    for marker, cls in _NATIVE_MARKERS:
        if marker in text:
            return cls(text)
    return None


def call_native(op, *args):
    """op(*args) for a tpext torch op, its core errors raised as their tpext types. Under
    torch.compile tracing the op is called as is (the trace never runs it)."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except RuntimeError as e:
        typed = native_error(e)
        if typed is None:
            raise
        raise typed from None
