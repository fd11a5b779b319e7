"""convlad: instance-level image retrieval with VLAD-encoded local features from any CNN layer."""
from importlib import import_module

__version__ = "0.1.0"
__all__ = ["ConvVLAD", "Config", "VLAD", "PCAWhitening", "IndexStore", "__version__"]

# Imported on first use (PEP 562): the store, its readers and the command line's usage errors do not
# pay for importing torch (2 s) unless they encode images.
_LAZY = {"ConvVLAD": "pipeline", "Config": "pipeline", "VLAD": "encoding", "PCAWhitening": "encoding",
         "IndexStore": "index.store"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'convlad' has no attribute {name!r}")
