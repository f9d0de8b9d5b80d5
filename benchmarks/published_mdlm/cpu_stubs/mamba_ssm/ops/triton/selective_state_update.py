from mamba_ssm._unavailable import unavailable

selective_state_update = unavailable("selective_state_update")
