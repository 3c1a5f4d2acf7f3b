"""PhoCLIP: a Vietnamese CLIP (ResNet50 + PhoBERT) and the library its pipeline uses.

Heavy modules (torch, timm, transformers) load on first use, so that light consumers
(the sharding workers) start fast.
"""
__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "load_model", "PhoCLIP", "__version__"]


def __getattr__(name):
    if name in ("create_model", "list_models", "load_model", "PhoCLIP"):
        from phoclip import model

        return getattr(model, name)
    raise AttributeError(f"module 'phoclip' has no attribute {name!r}")
