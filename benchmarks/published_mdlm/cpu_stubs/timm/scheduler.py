class CosineLRScheduler:
    """Placeholder base class; MDLM's utils.CosineDecayWarmupLRScheduler subclasses it at import time.

    Only the `lr_scheduler=cosine_decay_warmup` config instantiates it; install the real timm for that.
    """

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("timm stand-in: install timm to use lr_scheduler=cosine_decay_warmup")
