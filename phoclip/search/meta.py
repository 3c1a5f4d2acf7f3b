"""index.json, an index's description: the format (checked, read capped from a regular
file), the model that built it (its fingerprint: searching with another model is refused,
its embeddings would live in another space), the parts in use and the current version of
the search structure (`versions/<version>/`: faiss files, or nothing for exact search). A
writer writes a new version folder completely, then `publish`es index.json atomically, so
a reader sees the old index or the new one, never a torn one.

Paths an index records (items, the model, the images folder) are relative to the index
folder, with that folder's absolute path at build time (`built_in`), so that the index
works from any directory and when moved with its images. Also the check that an --out
folder is an index we wrote before anything is written into it."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Optional, Sequence

from phoclip.fileio import atomic_write_json, read_regular
from phoclip.search.parts import IMG, META, TEXT, TEXT_META

INDEX_META = "index.json"
VERSIONS = "versions"
FORMAT = 2
PATHS_RELATIVE = "relative to the index folder"  # index.json's `paths`: how item paths and the model are written
MAX_META_BYTES = 16 << 20  # index.json
KINDS = ("images", "captions")
_PART = re.compile(r"^\d{1,9}$")
_VERSION = re.compile(r"^[0-9]{4,9}-[0-9a-f]{8}$")


def read_meta(folder: Path) -> tuple[dict, tuple]:
    """The index.json of `folder`, read under MAX_META_BYTES from a regular file and
    checked (`check_meta`), with its stamp (`meta_stamp`); FileNotFoundError when there is
    none, ValueError in one line naming it when it is not an index description."""
    meta_f = folder / INDEX_META
    if not meta_f.is_file():
        raise FileNotFoundError(f"{folder} is not an index (no {INDEX_META}); build one with phoclip-index")
    try:  # a regular file under a cap: a FIFO, a device or a huge file is refused unread
        st = os.stat(meta_f)
        m = json.loads(read_regular(meta_f, MAX_META_BYTES))
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{meta_f}: unreadable ({type(e).__name__}: {e})") from None
    check_meta(m, meta_f)
    return m, (st.st_ino, st.st_mtime_ns, st.st_size)


def meta_stamp(folder: Path) -> Optional[tuple]:
    """What tells that index.json was replaced, from one stat: (inode, mtime, size); None
    when it cannot be read."""
    try:
        st = os.stat(folder / INDEX_META)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def check_meta(m, where: Path) -> None:
    """Refuse an index.json that does not describe an index, in one line naming it."""
    if (not isinstance(m, dict) or not isinstance(m.get("model_fingerprint"), str)
            or not isinstance(m.get("model"), str) or not _count(m.get("dim"))
            or not isinstance(m.get("count"), dict)):
        raise ValueError(f"{where}: not an index description (model_fingerprint, model, dim, count)")
    if m.get("format") != FORMAT or not isinstance(m.get("parts"), list):
        raise ValueError(f"{where}: not a format-{FORMAT} index (parts in clip-retrieval's layout); "
                         "rebuild it with this version's phoclip-index")
    m["count"].setdefault("captions", 0)  # an index of images only may not say
    for kind in KINDS:
        if not _count(m["count"].get(kind), zero=True):
            raise ValueError(f"{where}: count.{kind} must be a non-negative integer, not {_short(m['count'].get(kind))}")
    if m["dim"] > 65536:
        raise ValueError(f"{where}: dim {m['dim']} is not an embedding width")
    names, sums = set(), {"images": 0, "captions": 0}
    for rec in m["parts"]:
        if (not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not _PART.match(rec["name"])
                or not _count(rec.get("rows"), zero=True) or not _count(rec.get("captions", 0), zero=True)):
            raise ValueError(f"{where}: a part is not {{name: digits, rows, captions}}: {_short(rec)}")
        if rec["name"] in names:
            raise ValueError(f"{where}: part {rec['name']} listed twice")
        names.add(rec["name"])
        rec.setdefault("captions", 0)
        sums["images"] += rec["rows"]
        sums["captions"] += rec["captions"]
    for kind in KINDS:
        if sums[kind] != m["count"][kind]:
            raise ValueError(f"{where}: the parts hold {sums[kind]} {kind}, count.{kind} says {m['count'][kind]}")
    version = m.get("version")
    if version is not None and (not isinstance(version, str) or not _VERSION.match(version)):
        raise ValueError(f"{where}: version {_short(version)} is not a version name")
    search = m.get("search", {})
    if not isinstance(search, dict) or any(not isinstance(s, dict) for s in search.values()):
        raise ValueError(f"{where}: search must map kinds to descriptions")
    if any(s.get("type") == "faiss" for s in search.values()) and version is None:
        raise ValueError(f"{where}: a faiss search structure without a version folder")


def _count(v, zero: bool = False) -> bool:
    """Whether `v` is a count: an integer (not a bool), positive (or zero with `zero`)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= (0 if zero else 1)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:40] + "..."


def new_version(folder: Path, previous: Optional[str]) -> str:
    """The name of the next version folder: a sequence number and a random tail."""
    seq = int(previous.split("-")[0]) + 1 if previous else 1
    return f"{seq:04d}-{secrets.token_hex(4)}"


def publish(folder: Path, meta: dict) -> None:
    """Replace index.json atomically (its version folder written and fsynced before), then
    remove version folders named neither by it nor by the one it replaces (a reader that
    opened the previous one keeps its files for one more version)."""
    old = None
    try:
        old = json.loads(read_regular(folder / INDEX_META, MAX_META_BYTES)).get("version")
    except (OSError, ValueError, AttributeError):
        pass
    check_meta(json.loads(json.dumps(meta)), folder / INDEX_META)
    atomic_write_json(folder / INDEX_META, meta, indent=2)
    keep = {meta.get("version"), old}
    vdir = folder / VERSIONS
    if vdir.is_dir() and not vdir.is_symlink():  # through a link, the folders removed would be another's
        for d in vdir.iterdir():
            if d.name not in keep and _VERSION.match(d.name):
                shutil.rmtree(d, ignore_errors=True)


def index_meta(model, model_name: str, home: str, source: str, images_root: Optional[str]) -> dict:
    """The model and provenance fields of index.json (paths relative to `home`)."""
    from phoclip.models.pretrained import model_fingerprint  # lazy: reading an index needs no model code

    return {"format": FORMAT, "model_fingerprint": getattr(model, "fingerprint", None) or model_fingerprint(model),
            "model": relative(model_name, home), "paths": PATHS_RELATIVE, "built_in": home,
            "images_root": relative(images_root, home), "dim": int(model.config["embed_dim"]), "source": source}


_OUR_ENTRIES = frozenset({INDEX_META, VERSIONS, IMG, TEXT, META, TEXT_META, ".lock"})  # .lock: one publisher
_OUR_TEMP = re.compile(r"^\..+\.tmp$")  # phoclip.fileio's atomic temporary names


def check_out_folder(folder: str | os.PathLike) -> None:
    """Refuse, in one line naming it, an index folder to write that is not an index we
    wrote: an existing path that is not a folder, a folder holding anything besides an
    index's entries (index.json, img_emb/, text_emb/, metadata/, text_metadata/,
    versions/, our temporary files), or whose index.json is not an index description.
    Writing an index replaces or removes what it finds there: a user's folder that merely
    holds a file named index.json is never touched. An empty folder, or one holding only
    the parts of a job under way (no index.json yet), is fine."""
    out = Path(folder)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder: refusing to write an index there")
    other = sorted(e.name for e in out.iterdir() if e.name not in _OUR_ENTRIES and not _OUR_TEMP.match(e.name))
    if other:
        raise ValueError(f"{out} is not an index (it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}): "
                         "refusing to write into it (choose an empty or new --out folder)")
    f = out / INDEX_META
    if f.exists() or f.is_symlink():
        try:
            check_meta(json.loads(read_regular(f, MAX_META_BYTES, follow_links=False)), f)
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{out} is not an index we wrote ({f.name}: {str(e).splitlines()[0][:200]}): refusing to "
                             "write into it (choose an empty or new --out folder)") from None


# ---------------------------------------------------------------- recorded paths


def image_rows(items: Sequence[dict], home: str) -> list[dict]:
    """Items as metadata rows: `image_path` (the item's `path`) and `shard` relative to `home`."""
    rows = []
    for it in items:
        keys = path_keys(it)
        r = {k: (relative(v, home) if k in keys else v) for k, v in it.items()}
        r["image_path"] = r.pop("path", None)
        rows.append(r)
    return rows


def caption_rows(caption_items: Sequence[dict], image_items: Sequence[dict], first_image: int) -> list[dict]:
    """Caption items as text_metadata rows: their image as a row of this part."""
    return [{"caption": c.get("caption"), "image_key": c.get("image_key"),
             "image_row": int(c["image"]) - first_image if isinstance(c.get("image"), int) else None}
            for c in caption_items]


def images_root(source: str, items: Sequence[dict]) -> Optional[str]:
    """The folder the indexed pictures come from: `source` when it is a local folder,
    else the folder holding every item's local file (shards)."""
    if isinstance(source, str) and source and "://" not in source and os.path.isdir(source):
        return os.path.abspath(source)
    dirs = [os.path.dirname(os.path.abspath(v)) for it in items for k in path_keys(it)
            if isinstance(v := it.get(k), str) and v and "://" not in v and not v.startswith("pipe:")]
    try:
        root = os.path.commonpath(dirs) if dirs else None
    except ValueError:  # mixed drives (Windows)
        return None
    return root if root is not None and deep_enough(root) else None


def deep_enough(folder: str) -> bool:
    """Whether `folder` is at least two levels deep (/data/photos, not / or /home): a
    folder pictures may be served from without being named."""
    return len(Path(os.path.abspath(folder)).parts) >= 3


def path_keys(item: dict) -> tuple:
    """The keys of an item that are file paths: its `shard` when it comes from a shard
    (its `path` is then the image's name in the source dataset, not a file here), else its
    `path`."""
    return ("shard",) if item.get("shard") else ("path",)


def relative(p, home: str):
    """A local path (as the builder's working directory saw it) relative to `home`; URLs,
    `pipe:` commands and non-text as given."""
    if not isinstance(p, str) or not p or "://" in p or p.startswith("pipe:"):
        return p
    return os.path.relpath(os.path.abspath(p), home)
