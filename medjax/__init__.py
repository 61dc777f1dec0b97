"""medjax: fine-tune natural-domain vision foundation models for medical image classification in JAX."""

__version__ = "0.1.0"
