from flash_attn.layers import rotary  # noqa: F401
