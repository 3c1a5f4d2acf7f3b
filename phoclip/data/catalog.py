"""The shard catalogue: which shards a spec names (brace patterns, shard folders, their
manifest.json), where each shard's manifest.json and sizes.json are, how many samples the
shards hold, and whether they fit a model (every manifest asked, `Manifest.check_fits`)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

import braceexpand

from phoclip.data.manifest import Manifest, ManifestError, same_width
from phoclip.data.remote import is_remote, join_url, local_path, read_optional, url_dirname


def shard_name(url: str) -> str:
    """The shard's file name, as sizes.json lists it (for `pipe:` commands: the last
    word of the command that ends in .tar)."""
    if url.startswith("pipe:"):
        words = [w.rstrip(";|&") for w in url[5:].split() if w.rstrip(";|&").endswith(".tar")]
        if not words:
            raise ValueError(f"{url}: a pipe: shard command must name its .tar file (to find it in sizes.json)")
        return words[-1].rsplit("/", 1)[-1]
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def catalogue_dir(url: str, manifest: Optional[str] = None) -> str:
    """Where the shard's manifest.json and sizes.json are: beside `manifest` when given
    (data.manifest), else beside the shard. A `pipe:` shard has no place of its own."""
    if manifest:
        return url_dirname(manifest)
    if url.startswith("pipe:"):
        raise ValueError(f"{url}: for pipe: shards pass where their manifest is: data.manifest=URL "
                         "(sizes.json is read beside it)")
    return url_dirname(url)


MAX_SHARDS = 1_000_000
"""Shards one pattern may name (LAION-5B in shards of 10,000 samples is 500,000): a
pattern over it is refused from its count, before a name is made."""


def brace_count(pattern: str) -> int:
    """How many names `braceexpand.braceexpand(pattern)` yields, from its ranges and
    alternatives, expanding nothing (its `product` would hold every name of a range in
    memory: `{000000000..999999999}` is 10^9 strings). Mirrors braceexpand's parser:
    backslash escapes, `{a..b[..step]}` integer and letter ranges, `{x,y}` alternatives
    (nested), any other braces literal; unbalanced braces count 1 (braceexpand refuses them)."""
    n, start, depth, pos = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                n *= _expression_count(pattern[start + 1:pos])
            elif depth < 0:
                return 1
        pos += 1
    return n if depth == 0 else 1


def _expression_count(expr: str) -> int:
    for rx, value in ((braceexpand.int_range_re, int), (braceexpand.char_range_re, braceexpand.alphabet.index)):
        m = rx.match(expr)
        if m:
            a, b, step = m.groups()
            return abs(value(b) - value(a)) // ((int(step) or 1) if step else 1) + 1
    items, start, depth, pos = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth != 0 or not items:  # not alternatives: the braces are literal
        return brace_count(expr)
    return sum(brace_count(x) for x in items + [expr[start:]])


def expand_urls(spec: str, weights: Optional[str] = None, split: str = "train",
                flag: str = "the shard pattern") -> tuple[list[str], list[float]]:
    """`a/train-{000000..000009}.tar::b/train-{000000..000003}.tar` → urls, per-url weights.

    A source may also be a shard folder (`shards/vi`, `s3://bucket/vi/`) or its
    `manifest.json`: its `split` shards, as the manifest lists them. `weights` ("1::2")
    gives each source's sampling weight. Every local shard must exist; remote ones
    (`pipe:`, http(s)://, fsspec URLs) are read when the stream reaches them. `flag`
    names where the pattern came from (`--shards`, `data.train_shards`) in a refusal."""
    parts = [p for p in spec.split("::") if p]
    ws = [float(w) for w in weights.split("::")] if weights else [1.0] * len(parts)
    if len(ws) != len(parts):
        raise ValueError(f"{len(ws)} weights given for {len(parts)} shard sources in {spec!r}")
    counts = [0 if _names_a_folder(p) else brace_count(p) for p in parts]
    if sum(counts) > MAX_SHARDS:
        raise ValueError(f"{flag} names {sum(counts):,} shards ({parts[counts.index(max(counts))]!r} alone "
                         f"{max(counts):,}), over the {MAX_SHARDS:,} a run may list; check its brace ranges")
    urls, url_w = [], []
    for part, w in zip(parts, ws):
        expanded = _split_shards(part, split) if _names_a_folder(part) else list(braceexpand.braceexpand(part))
        for u in expanded:
            urls.append(u)
            url_w.append(w)
    missing = [u for u in urls if not is_remote(u) and not os.path.exists(local_path(u))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. "
                                f"{missing[0]}; check {flag} (or give the shard folder itself: every "
                                "shard its manifest.json lists)")
    return urls, url_w


def _names_a_folder(part: str) -> bool:
    if part.startswith("pipe:") or "{" in part:
        return False
    if part.endswith(("manifest.json", "/")):
        return True
    return not is_remote(part) and os.path.isdir(local_path(part))


def _split_shards(part: str, split: str) -> list[str]:
    """A shard folder's (or its manifest's) shards of one split, as manifest.json lists them."""
    man = part if part.endswith("manifest.json") else join_url(part.rstrip("/") or "/", "manifest.json")
    try:
        data = read_optional(man)
    except OSError as e:
        raise ValueError(f"{man}: cannot be read ({e})") from None
    if data is None:
        raise FileNotFoundError(f"{part}: no manifest.json there; give a shard folder made by make_shards, "
                                "its manifest.json, or a brace pattern such as 'shards/train-{000000..000009}.tar'")
    return [join_url(url_dirname(man), n) for n in Manifest.read(man, data).split_shards(split)]


def count_samples(urls: Iterable[str], manifest: Optional[str] = None) -> int:
    """Samples in the given shards, from the sizes.json files beside them (or beside
    `manifest`)."""
    total, cache = 0, {}
    for u in urls:
        n = shard_size(u, cache, manifest)
        if n is None:
            raise ValueError(f"{u} is not listed in {join_url(catalogue_dir(u, manifest), 'sizes.json')}")
        total += n
    return total


def shard_size(url: str, cache: dict, manifest: Optional[str] = None) -> Optional[int]:
    """The shard's sample count in the sizes.json of its catalogue, or None where it is not
    listed; `cache` keeps each sizes.json read once. ValueError when it is unreadable."""
    d = catalogue_dir(url, manifest)
    if d not in cache:
        f = join_url(d, "sizes.json")
        try:
            data = read_optional(f)
            sizes = json.loads(data.decode("utf-8")) if data is not None else {}
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in sizes.values()):
            raise ValueError(f"{f}: expected {{shard file: sample count}}")
        cache[d] = sizes
    return cache[d].get(shard_name(url))


def manifest_path(url: str, manifest: Optional[str] = None) -> str:
    """Where a shard's manifest.json is: `manifest` (data.manifest) or beside the shard."""
    return manifest or join_url(catalogue_dir(url), "manifest.json")


def manifest_for(url: str, manifest: Optional[str] = None) -> Optional[Manifest]:
    """The manifest of a shard (beside it, or `manifest`), or None where there is none."""
    p = manifest_path(url, manifest)
    try:
        data = read_optional(p)
    except OSError as e:
        raise ManifestError(f"{p}: cannot be read ({e})") from None
    return None if data is None else Manifest.read(p, data)


def shard_manifests(urls: Iterable[str], manifest: Optional[str] = None) -> dict[str, Manifest]:
    """{catalogue folder: its manifest} of every folder the shards come from; a folder
    with no manifest.json is refused (FileNotFoundError)."""
    seen: dict[str, Manifest] = {}
    for u in urls:
        d = catalogue_dir(u, manifest)
        if d not in seen:
            m = manifest_for(u, manifest)
            if m is None:
                raise FileNotFoundError(f"no manifest.json {'at ' + manifest if manifest else 'beside ' + u}: "
                                        "shards must be made by sharding/make_shards.py")
            seen[d] = m
    return seen


def check_shards_fit(urls: Iterable[str], tokenizer: Any, model: Any, tokenizer_name: str = "",
                     manifest: Optional[str] = None) -> Manifest:
    """Every manifest of the shards checked against the model (`Manifest.check_fits`)
    and against each other (`same_width`). Returns the first. `manifest`: where it is
    when not beside the shards (data.manifest; pipe: shards)."""
    mans = list(shard_manifests(urls, manifest).values())
    for m in mans:
        m.check_fits(tokenizer, model, tokenizer_name)
    return same_width(mans)
