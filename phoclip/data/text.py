"""Vietnamese text processing: normalisation, word segmentation, tokenization.

Everything here runs once, at sharding time (and for search queries); nothing is
segmented or tokenized inside the training loop.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

from phoclip.errors import SetupError
from phoclip.fileio import read_regular

logger = logging.getLogger(__name__)

_WS = re.compile(r"\s+")
# terminal escape sequences (CSI "ESC [ ... m", OSC "ESC ] ... BEL", two-byte ESC x) and
# the other C0/C1 control characters: text that would repaint a terminal or hide itself
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    """Remove terminal escape sequences and control characters (tabs and newlines stay)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))

# py_vncorenlp.download_model needs its folder to exist and, when a download fails, leaves
# a partial models/ there that its next try refuses: it downloads into a fresh temporary
# folder, copied to the destination only once complete
VNCORENLP_DOWNLOAD_LINE = (
    "python -c \"import shutil, tempfile, py_vncorenlp; t = tempfile.mkdtemp(); "
    "py_vncorenlp.download_model(save_dir=t); shutil.copytree(t, '/abs/path/vncorenlp', dirs_exist_ok=True)\"")
VNCORENLP_DOWNLOAD_HINT = (
    "Download the VnCoreNLP word segmenter once with\n"
    f"  {VNCORENLP_DOWNLOAD_LINE}\n"
    "(it needs GitHub access, wget and Java 8+), then pass --vncorenlp-dir /abs/path/vncorenlp "
    "(or set VNCORENLP_DIR); or use --segmenter underthesea, which works offline."
)
VNCORENLP_ENV = "VNCORENLP_DIR"


def resolve_vncorenlp_dir(flag: str | os.PathLike | None = None) -> Path:
    """Where the VnCoreNLP model is, in one order everywhere (sharding, training's query
    grids, search): the flag, then $VNCORENLP_DIR, else an error naming both."""
    d = flag or os.environ.get(VNCORENLP_ENV)
    if not d:
        raise SetupError("VnCoreNLP needs the folder of its model: pass --vncorenlp-dir DIR or "
                           f"set {VNCORENLP_ENV}=DIR (neither was given). " + VNCORENLP_DOWNLOAD_HINT)
    return Path(d).absolute()  # py_vncorenlp chdirs; a relative path would break


MAX_CAPTION_CHARS = 4096
"""Captions are cut to this many characters before anything else touches them (NFC,
segmentation, tokenization). PhoBERT reads at most a few hundred tokens, i.e. far fewer
characters; a hostile multi-megabyte line would otherwise take gigabytes to segment."""


def cap_text(text: str, limit: int = MAX_CAPTION_CHARS) -> str:
    """`text` cut to at most `limit` characters (the cut is the caller's to count)."""
    return text if len(text) <= limit else text[:limit]


def normalize_text(text: str) -> str:
    """Unicode NFC, control characters and terminal escapes removed, all whitespace runs
    to one space, stripped.

    Vietnamese text arrives both precomposed (NFC) and decomposed (NFD, common from
    macOS); PhoBERT's vocabulary is NFC, so NFD input would silently become <unk>.
    """
    return _WS.sub(" ", strip_controls(unicodedata.normalize("NFC", text))).strip()


class Segmenter(Protocol):
    """Word segmenter: joins the syllables of multi-syllable words with '_'."""

    name: str
    version: str

    def segment(self, texts: Sequence[str]) -> list[str]:
        ...


class NoSegmenter:
    """For input that is already word-segmented."""

    name = "none"
    version = "0"

    def segment(self, texts: Sequence[str]) -> list[str]:
        return [normalize_text(t) for t in texts]


class UndertheseaSegmenter:
    """underthesea's CRF word segmenter: offline, joins names as VnCoreNLP does."""

    name = "underthesea"

    def __init__(self) -> None:
        import underthesea
        from underthesea import word_tokenize

        self.version = underthesea.__version__
        self._tokenize = word_tokenize

    def segment(self, texts: Sequence[str]) -> list[str]:
        return [normalize_text(self._tokenize(normalize_text(t), format="text")) for t in texts]


class PyviSegmenter:
    """pyvi's CRF segmenter: faster than underthesea, slightly less accurate
    (bench/RESULTS.md, sharding)."""

    name = "pyvi"

    def __init__(self) -> None:
        from importlib.metadata import version

        from pyvi import ViTokenizer

        self.version = version("pyvi")
        self._tok = ViTokenizer

    def segment(self, texts: Sequence[str]) -> list[str]:
        return [normalize_text(self._tok.tokenize(normalize_text(t))) for t in texts]


class VnCoreNLPSegmenter:
    """VnCoreNLP (the segmenter PhoBERT was pre-trained with) through py_vncorenlp.

    The JVM is started once, in the process that segments; a JVM does not survive a
    fork, so the sharding CLI starts its image workers with 'spawn'.
    """

    name = "vncorenlp"

    def __init__(self, model_dir: str | os.PathLike | None = None) -> None:
        if shutil.which("java") is None:
            raise SetupError("VnCoreNLP needs Java 8+ on PATH and none was found. "
                               "Install a JRE (e.g. apt-get install default-jre-headless). "
                               + VNCORENLP_DOWNLOAD_HINT)
        model_dir = resolve_vncorenlp_dir(model_dir)
        jar = model_dir / "VnCoreNLP-1.2.jar"
        wseg = model_dir / "models" / "wordsegmenter"
        if not jar.is_file() or not wseg.is_dir():
            raise SetupError(f"VnCoreNLP model not found in {model_dir} "
                               f"(expected {jar.name} and models/wordsegmenter/). "
                               + VNCORENLP_DOWNLOAD_HINT)
        import py_vncorenlp

        cwd = os.getcwd()
        try:
            self._model = py_vncorenlp.VnCoreNLP(annotators=["wseg"], save_dir=str(model_dir))
        finally:
            os.chdir(cwd)  # py_vncorenlp leaves the process in its model folder
        self.version = f"VnCoreNLP-1.2 (py_vncorenlp {_dist_version('py_vncorenlp')})"

    def segment(self, texts: Sequence[str]) -> list[str]:
        out = []
        for t in texts:
            sents = self._model.word_segment(normalize_text(t))
            out.append(normalize_text(" ".join(sents)))
        return out


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


SEGMENTERS = ("vncorenlp", "underthesea", "pyvi", "none")


def create_segmenter(name: str, vncorenlp_dir: str | None = None) -> Segmenter:
    """Build a segmenter by name: vncorenlp, underthesea, pyvi or none. VnCoreNLP's model
    folder: `vncorenlp_dir`, else $VNCORENLP_DIR (see `resolve_vncorenlp_dir`)."""
    if name == "none":
        return NoSegmenter()
    if name == "underthesea":
        return UndertheseaSegmenter()
    if name == "pyvi":
        return PyviSegmenter()
    if name == "vncorenlp":
        return VnCoreNLPSegmenter(vncorenlp_dir)
    raise ValueError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")


# ----------------------------------------------------------------------------- tokenizer

OFFLINE_TOKENIZER_RECIPE = ("build one from your own captions with build_phobert_tokenizer: "
                            "docs/sharding.md#offline-a-tokenizer-from-your-own-captions")
HUB_PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub ($HF_ENDPOINT, through the proxy settings) answers
    within `timeout_s`; False at once under HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE. Asked
    once per process: without a network transformers retries each file for tens of
    seconds, printing a warning per try, before it fails."""
    if any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError) as e:
        logger.warning("the Hugging Face hub (%s) cannot be reached (%s): hub names are read from the local "
                       "cache only", endpoint, getattr(e, "reason", e))
        return False
    return True


TOKENIZER_FILES = ("vocab.txt", "bpe.codes", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
                   "chat_template.json")
MAX_TOKENIZER_FILE_BYTES = 64 << 20  # PhoBERT's vocab.txt and bpe.codes are about 1 MB each


def check_tokenizer_folder(folder: Path) -> dict:
    """Each tokenizer file a local folder holds (`TOKENIZER_FILES`) read as a regular file
    of at most MAX_TOKENIZER_FILE_BYTES, before transformers opens it by name: a FIFO
    (which blocks for ever), a link to /dev/zero (which never ends) or an over-large file
    is a SetupError naming it. Returns the parsed tokenizer_config.json ({} where absent)."""
    cfg: dict = {}
    for name in TOKENIZER_FILES:
        f = folder / name
        if not (f.exists() or f.is_symlink()):
            continue
        try:
            data = read_regular(f, MAX_TOKENIZER_FILE_BYTES)
        except OSError as e:
            raise SetupError(f"tokenizer folder {folder}: {e}") from None
        if name == "tokenizer_config.json":
            try:
                cfg = json.loads(data.decode("utf-8"))
            except (ValueError, RecursionError) as e:
                raise SetupError(f"{f}: not a JSON tokenizer config ({type(e).__name__}: {str(e)[:200]})") from None
    return cfg if isinstance(cfg, dict) else {}


def load_tokenizer(name_or_path: str):
    """The PhoBERT tokenizer (or any transformers tokenizer) by hub name or local folder.
    A local folder whose tokenizer_config.json names PhobertTokenizer loads that class
    directly: AutoTokenizer's import chain (generation utilities, scikit-learn) costs
    seconds per process and gives the same class. A hub name without a reachable hub is
    read from the local cache only (`hub_reachable`: seconds, not transformers' retries).
    A local folder's files are checked first (`check_tokenizer_folder`)."""
    phobert = False
    if Path(name_or_path).is_dir():
        phobert = check_tokenizer_folder(Path(name_or_path)).get("tokenizer_class") == "PhobertTokenizer"
    if phobert:
        from transformers import PhobertTokenizer as cls
    else:
        from transformers import AutoTokenizer as cls
    offline = not Path(name_or_path).exists() and not hub_reachable()
    try:
        return cls.from_pretrained(name_or_path, **({"local_files_only": True} if offline else {}))
    except OSError as e:
        raise SetupError(
            f"cannot load tokenizer {name_or_path!r}"
            + (" (the Hugging Face hub cannot be reached and it is not in the local cache)" if offline else f": {e}")
            + "\nPass a local folder holding vocab.txt and bpe.codes (PhoBERT's format; "
            f"{OFFLINE_TOKENIZER_RECIPE}), or a hub name on a machine that can reach the Hugging Face hub.") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that decides token ids: class, vocabulary, merges."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.replace("Fast", "").encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    ranks = getattr(tokenizer, "bpe_ranks", None)
    if ranks:
        h.update(json.dumps(sorted((" ".join(k), v) for k, v in ranks.items()),
                            ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def tokenize_captions(tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Token ids of segmented captions: int32 [n, max_length], truncated, padded with pad id."""
    if not texts:
        return np.zeros((0, max_length), dtype=np.int32)
    enc = tokenizer(list(texts), max_length=max_length, truncation=True,
                    padding="max_length", return_attention_mask=False)
    return np.asarray(enc["input_ids"], dtype=np.int32)


class TextProcessor:
    """normalise → segment → tokenize, the one path used by sharding and by search."""

    def __init__(self, tokenizer, segmenter: Segmenter, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.segmenter = segmenter
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        cut = [cap_text(t) for t in texts]  # before NFC and segmentation, whose cost grows with length
        n_cut = sum(len(a) != len(b) for a, b in zip(cut, texts))
        if n_cut:
            logger.warning("cut %d text(s) over %d characters to that length", n_cut, MAX_CAPTION_CHARS)
        seg = self.segmenter.segment([normalize_text(t) for t in cut])
        return seg, tokenize_captions(self.tokenizer, seg, self.max_length)


# ----------------------------------------------------------------------------- vocab builder

def build_phobert_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike,
                            min_count: int = 1) -> Path:
    """Write a PhoBERT-format tokenizer (vocab.txt + bpe.codes) whose BPE merges every
    whitespace word of `texts` (already segmented) back into one token.

    For corpora that the real PhoBERT vocabulary cannot be downloaded for (tests, the
    offline demo). The files are the real format and load with `PhobertTokenizer`.
    """
    from transformers import PhobertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter(w for t in texts for w in t.split())
    words = sorted(w for w, c in counts.items() if c >= min_count)
    merges: dict[tuple[str, str], int] = {}
    for w in words:
        sym = list(w[:-1]) + [w[-1] + "</w>"]
        cur = sym[0]
        for s in sym[1:]:
            merges.setdefault((cur, s), counts[w])
            cur = cur + s
    with open(out / "bpe.codes", "w", encoding="utf-8") as f:
        for (a, b), c in merges.items():
            f.write(f"{a} {b} {c}\n")
    # The pieces each word really becomes under these merges form the vocabulary, so no
    # corpus word maps to <unk> even where two words' merge chains interfere.
    (out / "vocab.txt").write_text("", encoding="utf-8")
    probe = PhobertTokenizer(str(out / "vocab.txt"), str(out / "bpe.codes"))
    pieces: Counter = Counter()
    for w in words:
        for p in probe.bpe(w).split(" "):
            pieces[p] += counts[w]
    with open(out / "vocab.txt", "w", encoding="utf-8") as f:
        for p, c in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
            f.write(f"{p} {c}\n")
    PhobertTokenizer(str(out / "vocab.txt"), str(out / "bpe.codes")).save_pretrained(str(out))
    return out
