"""What a model argument names, decided without torch or transformers (so a typo fails in well
under a second): a lowbit checkpoint, a built-in alias, a local Hugging Face folder, a GGUF file,
or a hub id.

A name that looks like a path never goes to the hub, and the hub is asked once, with a short
timeout, before ``transformers`` would retry for half a minute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lowbit.errors import LowbitError
from lowbit.models.aliases import ALIASES

INDEX = "model.safetensors.index.json"  # which shard holds each tensor, when there are several
CHECKPOINT_MARKER = "lowbit_config.json"
HUB_TIMEOUT_S = 5.0


def cache_dir() -> Path:
    """Where converted models are kept: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


@dataclass(frozen=True)
class ModelRef:
    kind: Literal["checkpoint", "alias", "local", "gguf", "hub"]
    name: str  # as the user gave it
    path: Path | None = None  # for checkpoints, local folders and GGUF files


def looks_local(name: str) -> bool:
    """A path, not a hub id ``org/name``: starts like one, has two slashes, or its first part exists here."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return "/" in name and Path(first).exists()


def tensor_files(folder: Path) -> dict[str, Path]:
    """Which file holds each tensor: the shard index when there is one, else ``model.safetensors`` (headers only)."""
    import json

    from safetensors import safe_open

    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise LowbitError(f"{folder / INDEX} is damaged (no weight_map)") from None
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise LowbitError(f"{folder} has no model.safetensors nor {INDEX}: its weights must be safetensors files")
    with safe_open(str(single), "numpy") as f:
        return dict.fromkeys(f.keys(), single)


def tensor_shape(files: dict[str, Path], key: str) -> list[int]:
    """A tensor's shape from its file's header (``files``: :func:`tensor_files`), without reading it."""
    from safetensors import safe_open

    with safe_open(str(files[key]), "numpy") as f:
        return f.get_slice(key).get_shape()


def partial_checkpoint(path: Path) -> bool:
    """Tensors that lowbit wrote without the config that says how to read them (an older lowbit killed
    between two writes, or files copied in part): loading them as a plain model would give random layers."""
    tensors = path / "model.safetensors"
    if (path / CHECKPOINT_MARKER).exists() or not tensors.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(tensors), "numpy") as f:  # the header only
            return (f.metadata() or {}).get("format") == "lowbit"
    except Exception:  # a damaged file is not recognisably ours; its loader reports it
        return False


def _interrupted_save(path: Path) -> str:
    """Where the previous checkpoint is when a save was killed between its two renames."""
    old = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
    return f" (a save into it was interrupted: the previous checkpoint is in {old[0]})" if old else ""


def resolve(name: str, *, check_hub: bool = True) -> ModelRef:
    """Classify ``name``; a missing path or an unreachable hub id is a one-line error."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / CHECKPOINT_MARKER).is_file():
        return ModelRef("checkpoint", name, path)
    if path.is_dir() and partial_checkpoint(path):
        raise LowbitError(f"'{name}' holds a partial lowbit checkpoint (no {CHECKPOINT_MARKER}): "
                          "quantize again into it with --overwrite")
    if name in ALIASES:
        ALIASES[name].check_installed()
        return ModelRef("alias", name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LowbitError(f"model path '{name}' is not a directory with a Hugging Face model (no config.json)")
        return ModelRef("local", name, path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelRef("gguf", name, path)
    if path.exists() or looks_local(name):
        what = f"does not exist{_interrupted_save(path)}" if not path.exists() else \
            "is not a directory with a Hugging Face model"
        raise LowbitError(f"model path '{name}' {what}")
    if check_hub:
        _check_hub(name)
    return ModelRef("hub", name)


def _unknown(name: str, why: str) -> LowbitError:
    known = ", ".join(sorted(ALIASES))
    return LowbitError(f"unknown model '{name}': not a built-in alias ({known}), a local directory, "
                       f"or a Hugging Face id that can be loaded ({why})")


def _check_hub(name: str) -> None:
    """One request for the id's config; offline, a cached copy is used as it is."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # transformers depends on it; without it nothing loads from the hub
        raise _unknown(name, "huggingface_hub is not installed") from None
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        raise _unknown(name, "not a valid id") from None
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise _unknown(name, "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache")
        return
    try:
        huggingface_hub.model_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise _unknown(name, "the hub has no such model, or it is private: log in with `hf auth login`") from None
    except Exception as exc:  # network down, DNS, timeout, proxy
        if not cached:
            raise _unknown(name, f"the hub cannot be reached: {type(exc).__name__}") from None
        # use the cached copy without transformers' retries against an unreachable hub
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
