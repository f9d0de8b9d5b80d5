def unavailable(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"{name}: mamba_ssm is CUDA-only; this CPU stand-in only lets "
                                  "models/dimamba.py import")
    fn.__name__ = name
    return fn
