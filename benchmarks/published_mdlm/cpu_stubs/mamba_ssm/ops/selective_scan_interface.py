from mamba_ssm._unavailable import unavailable

mamba_inner_fn = unavailable("mamba_inner_fn")
selective_scan_fn = unavailable("selective_scan_fn")
