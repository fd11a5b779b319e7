"""convlad: instance-level image retrieval with VLAD-encoded local features from any CNN layer."""
from .encoding import PCAWhitening, VLAD
from .pipeline import Config, ConvVLAD

__version__ = "0.1.0"
__all__ = ["ConvVLAD", "Config", "VLAD", "PCAWhitening", "__version__"]
