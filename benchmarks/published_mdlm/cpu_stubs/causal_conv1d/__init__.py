"""Stand-in for the CUDA-only `causal_conv1d` package.

models/dimamba.py checks `causal_conv1d_fn is None` / `causal_conv1d_update is None`
and then uses its own torch fallback, so None is the honest CPU value.
"""
causal_conv1d_fn = None
causal_conv1d_update = None
