"""Stand-in for the CUDA-only `mamba_ssm` package: names only (DiMamba is not benchmarked)."""
