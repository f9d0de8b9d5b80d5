"""CPU stand-in for the `flash_attn` package (torch ops only).

Provides the subset of the flash-attn 2.x API that the published MDLM code
calls, with the same argument conventions, implemented with plain torch.
"""
__version__ = "2.5.6+cpustub"

from flash_attn import flash_attn_interface  # noqa: F401  (attribute access flash_attn.flash_attn_interface)
from flash_attn import layers  # noqa: F401
from flash_attn.flash_attn_interface import (  # noqa: F401
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
