"""DID (Deletion-Insertion Diffusion, arXiv 2603.23507), the whole paper in one package.

  noise.py    the deletion forward process (survival alpha(t), loss weight 1/t)
  dp.py       the subsequence-counting dynamic program: insertion targets in log space
  loss.py     DISE / DICE
  heads.py    seqnorm (fixed length) and count-softmax (variable length) output heads
  packing.py  survivors of two rows packed into one model row, antithetic times
  method.py   the `DID` method (train loss, NELBO, score function)
  sampler.py  the "did" decoder: tau-leaping insertions
  lengths.py  the sampler's exact length law under a calibrated count head (analysis, numpy)
  oracles.py  brute-force counts and targets (tests)
"""

from dlm_jax.methods.did.method import DID  # noqa: F401
import dlm_jax.methods.did.sampler  # noqa: F401,E402  (registers the "did" decoder)
