"""t5align: online vs offline preference alignment of T5 models in JAX."""

__version__ = "0.1.0"
