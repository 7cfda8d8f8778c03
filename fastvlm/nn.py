"""Drop-in fused layers for any model: each built from an existing module, which it holds by reference (its
weight is not copied), and each a tuner layer (the contract of docs/tuners.md: ``tuner_parameters()``,
``bypass``, ``merge`` / ``unmerge`` where the method allows it, ``config``).

- ``MaskedLinear``: ``x (W * [S > tau])^T + b`` (``W``, ``b``: the wrapped module's frozen weight and bias),
  through the fused ``masked_linear``;
- ``MaskedConv2d``: ``conv2d(x, W * [S > tau], b)``; a patch conv (stride = kernel) as the fused masked matmul
  over patches, any other conv on the reference path (``layer.fused`` says which);
- ``OrthogonalLinear``: ``(x blockdiag(R)) W^T + b``, R = cayley(params) exact, through the fused
  ``orthogonal_linear``;
- ``LoRALinear``: ``x W^T + b + (alpha / r) (x A^T) B^T`` (plain torch);
- ``ProjectedMultiheadAttention``: an ``nn.MultiheadAttention`` whose ``in_proj`` (packed QKV) and ``out_proj``
  are linear modules that the layers above replace (``scaled_dot_product_attention`` between them).

Each starts as the module it wraps (masks all on, R = I, B = 0). The constructors ``from_linear`` /
``from_conv`` / ``from_mha`` freeze the wrapped module's own parameters (``freeze=False`` keeps them), so
only the new layer's parameters train. Attention in transformers and timm models is separate q/k/v (or one
fused ``qkv``) ``nn.Linear`` modules: the linear layers cover it. To patch a whole model by name or by
architecture preset use ``apply_masks`` / ``apply_orth`` / ``apply_lora`` with ``target_modules``
(docs/tuners.md); the math of each method is in docs/methods.md.
"""

from .tuners._attention import ProjectedMultiheadAttention
from .tuners.lora import LoRALinear
from .tuners.mask import MaskedConv2d, MaskedLinear
from .tuners.orth import OrthLinear as OrthogonalLinear

__all__ = ["MaskedLinear", "MaskedConv2d", "OrthogonalLinear", "LoRALinear", "ProjectedMultiheadAttention"]
