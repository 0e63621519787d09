"""Raw text, from the first of: ``$LOWBIT_DATA``, a ``shared/data`` folder beside the checkout (or
the working directory), the copy embedded in the package (``lowbit/data/text``, sha256 checked).

``LOWBIT_DATA=hub`` reads the full shards from the Hugging Face hub instead (``lowbit[hub]``).
Layout of a data folder (the same as the hub files): ``wikitext-2-raw/wiki.test.raw`` and
``c4/c4-{train.00000-of-01024,validation.00000-of-00008}*.jsonl``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from lowbit.errors import LowbitError

DATASETS = ("wikitext2", "c4")
NAMED = (*DATASETS, "ptb")  # ptb is never shipped (its licence forbids it): read from a data folder only
TEXT_SUFFIXES = (".txt", ".raw")  # raw text, cut into windows as WikiText-2 is
JSONL_SUFFIXES = (".jsonl",)  # documents with a "text" field, joined as C4's are
PTB_FILE = "ptb/ptb.test.txt"
SAMPLING = ("documents", "concat")  # how calibration windows are cut (see ``protocol.calibration``)
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
EMBEDDED = Path(__file__).resolve().parent / "text"
HUB = "hub"  # the value of LOWBIT_DATA that asks for the hub's full shards
CHECKOUT = Path(__file__).resolve().parents[2]  # a source checkout's root (site-packages when installed)


def data_dir() -> Path | None:
    """The folder text is read from; ``None`` means the hub (``LOWBIT_DATA=hub``)."""
    env = os.environ.get("LOWBIT_DATA")
    if env:
        if env == HUB:
            return None
        if not Path(env).expanduser().is_dir():
            raise LowbitError(f"LOWBIT_DATA={env} is not a folder (it needs wikitext-2-raw/ and c4/; "
                              f"unset it to use the text embedded in lowbit, or set it to '{HUB}')")
        return Path(env).expanduser()
    for base in (Path.cwd(), CHECKOUT):
        for candidate in (base / "shared" / "data", base.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    return EMBEDDED


def check_data_available() -> None:
    """Fail fast (before a model is loaded) when the text cannot be had."""
    if data_dir() is None:
        _datasets_module()


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise LowbitError(f'LOWBIT_DATA={HUB} needs `pip install "lowbit[hub]"`') from None
    return datasets


@functools.lru_cache(maxsize=1)
def _embedded_sums() -> dict[str, str]:
    lines = (EMBEDDED / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def read_bytes(root: Path, relative: str) -> bytes:
    """A data file's bytes; the embedded copy must match its recorded sha256."""
    data = (root / relative).read_bytes()
    if root == EMBEDDED and hashlib.sha256(data).hexdigest() != _embedded_sums().get(relative):
        raise LowbitError(f"embedded data file {root / relative} is damaged (sha256 differs); reinstall lowbit")
    return data


@functools.lru_cache(maxsize=2)
def wikitext2_test_rows() -> tuple[str, ...]:
    """The rows of WikiText-2-raw-v1 ``test`` exactly as the ``datasets`` loader yields them."""
    root = data_dir()
    if root is None:
        return tuple(_hub("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    relative = "wikitext-2-raw/wiki.test.raw"
    if not (root / relative).is_file():
        raise LowbitError(f"no {relative} in the data folder {root}")
    raw = _decode(root, relative)
    return tuple(line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1])


@functools.lru_cache(maxsize=4)
def c4_documents(split: str) -> tuple[str, ...]:
    """C4 ``en`` documents of shard 0 of ``split`` (train or validation)."""
    if split not in C4_FILES:
        raise LowbitError(f"unknown C4 split '{split}' (train, validation)")
    root = data_dir()
    if root is None:
        return tuple(_hub("allenai/c4", data_files={split: C4_FILES[split]}, split=split)["text"])
    local = sorted((root / "c4").glob(f"c4-{split}.*.jsonl")) if (root / "c4").is_dir() else []
    if not local:
        raise LowbitError(f"no c4/c4-{split}.*.jsonl in the data folder {root}")
    return _jsonl_texts(root, str(local[0].relative_to(root)))


def _jsonl_texts(root: Path, relative: str) -> tuple[str, ...]:
    try:  # split on "\n" only: a document may hold other line separators (U+2028)
        docs = tuple(json.loads(line)["text"] for line in _decode(root, relative).split("\n") if line.strip())
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LowbitError(f"{root / relative} is not JSON lines with a 'text' field") from None
    if not all(isinstance(d, str) for d in docs):
        raise LowbitError(f"{root / relative}: every 'text' field must be a string")
    return docs


def _decode(root: Path, relative: str) -> str:
    try:
        return read_bytes(root, relative).decode("utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"{root / relative} is not UTF-8 text") from None


def text_file(spec: str) -> Path | None:
    """The user's own file that ``spec`` names (by its suffix), or None for a named set."""
    if spec in NAMED:
        return None
    path = Path(spec).expanduser()
    return path if path.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES else None


def check_dataset(spec: str, what: str = "dataset") -> None:
    """A named set, or a readable text file of a kind we know: checked before any model loads."""
    if spec in DATASETS:
        return
    if spec == "ptb":
        ptb_rows()
        return
    path = text_file(spec)
    if path is None:
        raise LowbitError(f"unknown {what} '{spec}' (known: {', '.join(NAMED)}, or a .txt / .jsonl file)")
    if not path.is_file():
        raise LowbitError(f"{what} file {spec} does not exist")
    texts = file_rows(path) if path.suffix.lower() in TEXT_SUFFIXES else jsonl_documents(path)
    if not any(t.strip() for t in texts):
        raise LowbitError(f"{what} file {spec} holds no text")


def is_jsonl(spec: str) -> bool:
    path = text_file(spec)
    return path is not None and path.suffix.lower() in JSONL_SUFFIXES


@functools.lru_cache(maxsize=8)
def file_rows(path: Path) -> tuple[str, ...]:
    """A raw text file's rows exactly as WikiText-2's (a blank line is an empty row, others end in a newline)."""
    raw = _decode(path.parent, path.name)
    lines = raw.split("\n")
    lines = lines[:-1] if raw.endswith("\n") else lines
    return tuple(line + "\n" if line.strip() else "" for line in lines)


@functools.lru_cache(maxsize=8)
def jsonl_documents(path: Path) -> tuple[str, ...]:
    """A user's JSON-lines file: the ``text`` of each line, in order."""
    return _jsonl_texts(path.parent, path.name)


@functools.lru_cache(maxsize=1)
def ptb_rows() -> tuple[str, ...]:
    """Penn Treebank's test sentences, one a line, from the data folder (LOWBIT_DATA/ptb/ptb.test.txt)."""
    root = data_dir()
    if root is None or not (root / PTB_FILE).is_file():
        raise LowbitError(f"ptb is read from a data folder's {PTB_FILE} (it cannot ship with lowbit: its licence "
                          f"forbids it); put the file there and set LOWBIT_DATA, or pass the file's path instead")
    return tuple(line for line in _decode(root, PTB_FILE).split("\n") if line.strip())


def source_key(spec: str) -> str:
    """What names a dataset in a cache key: a file by its bytes too, so an edited file is a new dataset."""
    path = text_file(spec)
    if path is None:
        return spec
    return f"{path.resolve()}@sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def source_label(spec: str) -> str:
    """A file-name-safe label (per-window log names): the set's name, or a file's stem and hash."""
    path = text_file(spec)
    return spec if path is None else f"{path.stem}-{source_key(spec).rsplit(':', 1)[1][:12]}"


def _hub(*args, **kwargs):
    datasets = _datasets_module()
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, auth, missing files: say what to do instead
        raise LowbitError(f"could not load {args[0]} from the hub ({type(exc).__name__}); "
                          "unset LOWBIT_DATA to use the text embedded in lowbit") from None
