"""The public, torch.nn.functional-style API of fastvlm.

Each function documents its exact math; its reference, torch path and autograd Function live in
``fastvlm/ops/<family>.py`` and its Triton kernels in ``kernels/<family>.py`` (``fastvlm.kernels``).
"""

from .ops.masked import grad_dropout, masked_linear
from .ops.orth import block_rotate, cayley, orthogonal_linear
from .ops.residual import residual_cross_entropy, residual_logits

__all__ = ["residual_logits", "residual_cross_entropy", "masked_linear", "grad_dropout", "cayley", "block_rotate",
           "orthogonal_linear"]
