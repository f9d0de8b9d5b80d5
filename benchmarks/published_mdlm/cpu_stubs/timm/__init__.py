"""Stand-in for `timm`: only `timm.scheduler.CosineLRScheduler` is named (as a base class) by MDLM's utils.py."""
from timm import scheduler  # noqa: F401
