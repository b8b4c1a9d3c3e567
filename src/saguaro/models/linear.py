"""nn.Linear that multiplies through oneDNN's prepacked weights for float32 inference on a CPU.

Speculative decoding pays off only if verifying K+1 tokens costs about what one token does. torch's
default float32 CPU matmul (MKL sgemm) loses that on some CPUs: measured on an AMD EPYC with AVX-512 at one
thread, a 1536x576 layer takes 0.05 ms for 1 row but 0.19 ms for 5 rows, while oneDNN with the weight
prepacked takes 0.05-0.06 ms for both, and the 49k-token output head drops from 7.2 to 3.9 ms even for
1 row. So inference forwards (no autograd) on CPU float32 use a packed copy of the weight, made on
first use and remade whenever the weight changes in place (training); everything else is nn.Linear.
The packed copy doubles the memory of the linear weights; `torch.backends.mkldnn.flags(enabled=False)`
turns the path off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    _packed: torch.Tensor | None = None
    _packed_version: int = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_packed(x):
            return F.linear(x, self.weight, self.bias)
        version = _version(self.weight)
        if self._packed is None or self._packed_version != version:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self._packed_version = version
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def _use_packed(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and _MKLDNN and torch.backends.mkldnn.enabled)

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: any packed copy is stale
        self._packed, self._packed_version = None, -1
        return super()._apply(fn, recurse)


def _version(weight: torch.Tensor) -> int:
    """The in-place update count; weights made under inference_mode have none (and are never trained)."""
    return 0 if weight.is_inference() else weight._version
