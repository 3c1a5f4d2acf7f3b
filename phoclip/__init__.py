"""PhoCLIP: a Vietnamese CLIP (ResNet50 + PhoBERT) and the library its pipeline uses.

    import phoclip
    model = phoclip.load("demo_out/run")
    img = model.embed_images(["photo.jpg"])
    txt = model.embed_texts(["Một con chó chạy trên bãi cỏ"])
    print(model.similarity(img, txt))

    index = phoclip.open_index("index/")                 # memory-mapped: opens in seconds at any size
    for m in index.search(txt, k=5)[0]:                  # by text, image or any embedding
        print(m.score, m.item["path"], m.item["caption"])

Heavy modules (torch, timm, transformers) load on first use, so that light consumers
(the sharding workers) start fast.
"""
__version__ = "0.1.0"

__all__ = ["load", "open_index", "PhoCLIPModel", "create_model", "list_models", "load_model", "PhoCLIP", "__version__"]

_FROM = {"load": "models.api", "open_index": "search.index", "PhoCLIPModel": "models.api", "create_model": "models.factory",
         "list_models": "models.factory", "load_model": "models.factory", "PhoCLIP": "models.clip"}


def __getattr__(name):
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f"phoclip.{_FROM[name]}"), name)
    raise AttributeError(f"module 'phoclip' has no attribute {name!r}")
