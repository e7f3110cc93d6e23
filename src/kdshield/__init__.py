"""kdshield: remove backdoors from language models by knowledge distillation."""

from kdshield.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
