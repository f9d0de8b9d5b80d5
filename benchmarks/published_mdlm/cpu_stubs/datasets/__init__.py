"""Stand-in for HF `datasets`: MDLM's dataloader.py imports it at module level, the benchmarks never load data."""


def __getattr__(name):
    # AttributeError (not NotImplementedError) so that hasattr()/introspection keep working.
    raise AttributeError(f"datasets.{name}: this is a stand-in for HF `datasets` with no data API; "
                         "install `datasets` to load corpora")
