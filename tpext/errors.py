"""Exception types. The native ones come from tpext._C; every one subclasses RuntimeError, except
bad arguments, which raise ValueError (or TypeError) naming the argument."""
from ._C import CommDestroyed, CommTimeout, CudaError, InvalidArgument, NcclError, TpextError

__all__ = ["TpextError", "NcclError", "CudaError", "CommTimeout", "CommDestroyed", "InvalidArgument"]
