"""t5align: online vs offline preference alignment of T5 encoder-decoder models in JAX."""

import setuptools

setuptools.setup(
    name="t5align",
    version="0.1.0",
    description=(
        "Online and offline preference alignment (IPO, DPO, SLiC, Best-of-2) of "
        "T5 v1.1 encoder-decoder models on a T5X-compatible JAX stack."
    ),
    packages=setuptools.find_packages(include=["t5align", "t5align.*"]),
    package_data={"t5align": ["data/assets/*", "models/assets/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        "gin-config>=0.5",
        "tensorstore>=0.1.60",
        "msgpack>=1.0",
        "sentencepiece>=0.2",
        "clu>=0.0.10",
        "matplotlib>=3.8",
        "numpy",
        "pyarrow",  # parquet copies of the public datasets
        "safetensors>=0.4",  # Hugging Face checkpoints (read with numpy, no torch)
        "ml_dtypes",
        "tensorboard",  # clu's metric writer
    ],
    extras_require={
        "test": ["pytest>=8"],
        # Reference implementation for import and parity tests only.
        "hf": ["torch==2.13.0", "transformers==5.23.0"],
    },
    entry_points={"console_scripts": ["t5align=t5align.cli:main"]},
)
