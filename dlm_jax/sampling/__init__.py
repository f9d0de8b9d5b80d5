"""Samplers and decoders shared by the methods, and the one decoder registry (`decoders.py`).

Importing the package registers the masked-family decoders (ancestral, threshold, fixed_k);
method packages register their own families' decoders (did, autoregressive).
"""

from dlm_jax.sampling import ancestral as _ancestral  # noqa: F401  (registers "ancestral")
from dlm_jax.sampling import blockwise as _blockwise  # noqa: F401  (registers "threshold", "fixed_k")
