"""cm3leon-jax: retrieval-augmented, token-based multimodal decoders in JAX."""

import setuptools

# Versions known to work together on Python 3.11 (see README, "Install").
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow~=2.20.0",  # tensorflow-text requires this distribution by name
    "tensorflow-text~=2.20.0",
    "tensorflow-datasets==4.9.10",
    "scann==1.4.2",
    "sentencepiece>=0.2.0,<0.2.3",
    "gin-config==0.5.0",
    "clu==0.0.12",
    "pillow",
    "numpy",
    "tqdm",
    "scipy",
    # tensorflow-datasets imports it for builders defined in a package
    # but does not declare it on Python 3.11.
    "importlib_resources",
    # The retrieval service and its client.
    "fastapi",
    "uvicorn",
    "httpx",
    # Captioning metrics (CIDEr-D, BLEU, METEOR, ROUGE-L) with their PTB tokenizer (runs Java).
    "pycocoevalcap==1.2",
]

EXTRAS_REQUIRE = {
    "dev": ["pytest", "pytest-xdist>=3.8", "hypothesis", "ruff==0.17.6"],
    # Reference implementations, used only by parity tests and peer benchmarks.
    # pytorch-fid (the FID parity reference) is installed by the Makefile with --no-deps: its
    # torchvision requirement would otherwise pull a torchvision build that does not import
    # beside the CPU torch ("operator torchvision::nms does not exist").
    "ref": ["torch==2.13.0", "transformers>=5,<6", "safetensors"],
    # Offline preprocessing at scale. Beam pulls protobuf < 7, which is why
    # sentencepiece stays below 0.2.3 in INSTALL_REQUIRES.
    "beam": ["apache-beam[tfrecord]"],
    # Submitting that preprocessing to Google Cloud Dataflow (launch/dataflow.py): Beam's
    # Dataflow runner. Not in `make install`: the Google Cloud clients are heavy and pin
    # protobuf against the rest.
    "dataflow": ["apache-beam[gcp,tfrecord]"],
    # Benchmarks' peers and data: faiss for retrieval, photographs for the tokenizer.
    "bench": ["faiss-cpu", "scikit-image", "matplotlib"],
    # libtpu, for ahead-of-time compilation against TPU topologies on a CPU host.
    "tpu": ["jax[tpu]==0.10.2"],
}

setuptools.setup(
    name="cm3leon_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["cm3leon_jax", "cm3leon_jax.*", "tasks", "tasks.*"]),
    include_package_data=True,
    # The CPU decode kernel's source, compiled on first use (cm3leon_jax/model/cpu_kernels.py).
    package_data={"cm3leon_jax.model": ["*.cc"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
