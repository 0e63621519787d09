"""What makes an auto-round row resumable and leaves the process as it found it (``autoround_peer``):
per-block weights and random states beside auto-round's own resume files, the finished tuning kept for a
rerun, and the process-wide state auto-round changes put back."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("lowbit.compare.peers.autoround_peer")  # one logger for the row's messages


class _NoMetaWeightsWarning(logging.Filter):
    """Drops auto-round's warning that a resumed in-memory model has empty weights. It is logged on
    every run with ``AR_RESUME_DIR`` set, resumed or not, and ``resumable`` puts the weights back
    when a run does resume, so in a lowbit row it is never true."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "AR_RESUME_DIR is set but neither" not in record.getMessage()




def restore_environ(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        restore_environ(old)


def rng_states() -> dict:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def save_rng_states(path: Path) -> None:
    """The random states as tensors and JSON (safetensors): read back without unpickling anything."""
    from safetensors.torch import save_file

    states = rng_states()
    version, mt, gauss = states["python"]
    kind, keys, pos, has_gauss, cached = states["numpy"]
    tensors = {"torch": states["torch"], "numpy_keys": torch.from_numpy(keys.astype("int64"))}
    tensors.update({f"cuda_{i}": t for i, t in enumerate(states["cuda"] or [])})
    meta = {"python": json.dumps([version, list(mt), gauss]), "numpy": json.dumps([kind, pos, has_gauss, cached]),
            "cuda": str(len(states["cuda"] or [])) if states["cuda"] is not None else "none"}
    save_file(tensors, str(path), metadata=meta)


def load_rng_states(path: Path) -> dict:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, mt, gauss = json.loads(meta["python"])
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    cuda = None if meta["cuda"] == "none" else [tensors[f"cuda_{i}"] for i in range(int(meta["cuda"]))]
    return {"python": (version, tuple(mt), gauss),
            "numpy": (kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
            "torch": tensors["torch"], "cuda": cuda}


def set_rng_states(states: dict) -> None:
    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class _BlockFiles:
    """Per finished block: its tuned weights and the random state it left; and the run's time up to each."""

    def __init__(self, state: Path):
        self.root, self.clock = state / "blocks", state / "seconds.json"
        self.root.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = json.loads(self.clock.read_text()) if self.clock.exists() else {}

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.root / f"{name}.safetensors", self.root / f"{name}.rng.safetensors"

    def save(self, model: nn.Module, name: str, seconds: float) -> None:
        from safetensors.torch import save_file

        from lowbit.atomic import atomic_path, atomic_write_text

        weights, rng = self.paths(name)
        with atomic_path(weights) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.get_submodule(name).state_dict().items()},
                      str(tmp))
        with atomic_path(rng) as tmp:
            save_rng_states(tmp)
        self.seconds[name] = seconds
        atomic_write_text(self.clock, json.dumps(self.seconds))

    def restore(self, model: nn.Module, done: list[str]) -> float:
        """Put back the finished blocks' weights and the last one's random state; its time so far."""
        from safetensors.torch import load_file

        for name in done:
            model.get_submodule(name).load_state_dict(load_file(str(self.paths(name)[0])))
        set_rng_states(load_rng_states(self.paths(done[-1])[1]))
        log.info("restored the tuned weights and random state of %d finished block(s) from %s", len(done), self.root)
        return self.seconds.get(done[-1], 0.0)


def _chain_files(rs, index: int) -> None:
    """One pair of auto-round's chain files per block: a kill while it writes one leaves the last pair whole."""
    rs.q_input_path = rs.dir / f"resume_q_input_{index:04d}.pt"
    rs.input_ids_path = rs.dir / f"resume_input_ids_{index:04d}.pt"


def _chain_holds(rs, files: _BlockFiles) -> bool:
    """An earlier run's state to resume from: some blocks done, not all, each with our files, chain readable."""
    done = rs.completed_blocks
    ok = len(done) < len(rs.block_names) and all(p.exists() for n in done for p in files.paths(n))
    try:
        ok = ok and torch.load(rs.input_ids_path, map_location="cpu") is not None
        if ok and rs.q_input_path.exists():
            torch.load(rs.q_input_path, map_location="cpu")
    except Exception:  # noqa: BLE001 - an unreadable chain file means: start afresh
        ok = False
    return ok


@contextmanager
def resumable(model: nn.Module, state: Path, settings: dict) -> Iterator[dict]:
    """auto-round's resume, made to give an uninterrupted run's weights (see ``autoround_peer``'s docstring).

    Per finished block this keeps the block's weights and the random-number state (auto-round draws
    each block's batch order from Python's ``random``, so a resumed block must start from the state
    the previous block left), and gives auto-round's two chain tensors one file pair per block, so a
    kill while it writes them leaves the previous block's pair intact. Nothing is put back until
    auto-round has loaded its chain and so committed to resuming; a state that does not hold
    (files missing or unreadable, every block already done, other ``settings``) starts afresh.
    Yields ``{"earlier_seconds": s}``: the tuning time of the blocks an interrupted run finished.
    """
    from auto_round.utils.resume import ResumeState

    from lowbit.atomic import atomic_write_text

    meta = state / "settings.json"
    if meta.exists() and json.loads(meta.read_text()) != settings:
        shutil.rmtree(state)
    files = _BlockFiles(state)
    atomic_write_text(meta, json.dumps(settings))
    load, mark, load_ids = ResumeState._load, ResumeState.mark_block_done, ResumeState.load_input_ids
    t0, kept = time.perf_counter(), {"earlier_seconds": 0.0}

    def load_checked(self) -> None:
        load(self)
        if self.completed_blocks:
            _chain_files(self, len(self.completed_blocks) - 1)
            if not _chain_holds(self, files):
                self.completed_blocks = []

    def restore_when_resuming(self):  # auto-round resumes once this returns its chain tensor
        ids = load_ids(self)
        if ids is not None and self.completed_blocks:
            kept["earlier_seconds"] = files.restore(model, self.completed_blocks)
        return ids

    def save_then_mark(self, name: str, *args) -> None:  # ours first: a block is done once the manifest says so
        files.save(model, name, kept["earlier_seconds"] + time.perf_counter() - t0)
        previous = (self.q_input_path, self.input_ids_path)
        _chain_files(self, len(self.completed_blocks))
        mark(self, name, *args)
        for p in previous:
            Path(p).unlink(missing_ok=True)

    ResumeState._load, ResumeState.mark_block_done = load_checked, save_then_mark
    ResumeState.load_input_ids = restore_when_resuming
    untrue = _NoMetaWeightsWarning()
    logging.getLogger("autoround").addFilter(untrue)
    try:
        with environ(AR_RESUME_DIR=str(state / "auto-round"), AR_WORK_SPACE=str(state / "work")):
            yield kept
    finally:
        ResumeState._load, ResumeState.mark_block_done, ResumeState.load_input_ids = load, mark, load_ids
        logging.getLogger("autoround").removeFilter(untrue)


@contextmanager
def global_state_kept() -> Iterator[None]:
    """Undo what auto-round changes process-wide (it seeds every RNG and sets print options)."""
    print_opts = {k: getattr(torch._tensor_str.PRINT_OPTS, k)
                  for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
    rng = rng_states()
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    determ = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    env = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    try:
        yield
    finally:
        torch.set_printoptions(**print_opts)
        set_rng_states(rng)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.use_deterministic_algorithms(determ[0], warn_only=determ[1])
        restore_environ(env)




def finished(state: Path, settings: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The tuned weights and row fields an earlier run of these ``settings`` kept, if any."""
    from safetensors.torch import load_file

    meta, weights, extra = state / "settings.json", state / "final.safetensors", state / "final.json"
    if not (weights.exists() and extra.exists() and meta.exists()) or json.loads(meta.read_text()) != settings:
        return None
    return load_file(str(weights)), json.loads(extra.read_text())


def keep_finished(state: Path, linears: dict[str, nn.Linear], extra: dict) -> None:
    """Tuning is done: keep its result for a rerun of the row (the evaluation can take hours on a
    CPU), and drop what only resuming the tuning needed."""
    from safetensors.torch import save_file

    from lowbit.atomic import atomic_path, atomic_write_text

    with atomic_path(state / "final.safetensors") as tmp:
        save_file({n: lin.weight.detach().cpu().contiguous() for n, lin in linears.items()}, str(tmp))
    atomic_write_text(state / "final.json", json.dumps(extra))  # written last: the pair is complete
    for sub in ("blocks", "auto-round", "work"):
        shutil.rmtree(state / sub, ignore_errors=True)
    (state / "seconds.json").unlink(missing_ok=True)
