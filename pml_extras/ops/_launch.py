"""How the ops apply their autograd Functions when the fused kernels run.

Dynamo cannot trace the Triton launchers (host-side grid and config arithmetic; under
TRITON_INTERPRET=1 it would trace the interpreter itself and fail), so under
torch.compile the Triton path opts out: one graph break, run eagerly, autograd intact.
The PyTorch path stays traceable. A leaf below every op module and the self-check.
"""

from __future__ import annotations

from .._validation import _compile_opt_out


@_compile_opt_out("pml_extras runs its fused Triton kernels eagerly; impl='torch' can be traced")
def apply_eagerly(function, *args):
    """``function.apply(*args)`` outside torch.compile's graph."""
    return function.apply(*args)


__all__ = ["apply_eagerly"]
