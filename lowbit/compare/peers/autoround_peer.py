"""Intel auto-round (Cheng et al. 2023): SignRound tuning of rounding offsets and clipping, block by block.

Runs auto-round's own default algorithm (``SignRoundConfig``: sign-SGD on the rounding offsets and
min/max scales, lr = 1/iters, best-loss weights kept, quantized block inputs) with its own preset
``W{bits}A16`` (auto-round's default symmetric int: codes -2^(b-1)..2^(b-1)-1 times a signed float16
scale per group, no zero point) at the comparison's group size, on lowbit's calibration token ids,
and keeps the fake-quantized weights it writes into each ``nn.Linear``.
Interpretations, and why:

* Calibration: all ``n`` rows of ``calib`` at their full length, in batches of ``min(8, n)``, given
  to auto-round as ``{"input_ids", "attention_mask"}`` dicts (an explicit all-ones mask, so that its
  pad-token heuristic never masks real tokens out of attention; it still zeroes the mask of the last
  position, and leaves pad-id/last positions out of its loss, as it does for any data). It is never
  given a dataset name, so it downloads nothing.
* Iterations: ``$LOWBIT_AUTOROUND_ITERS`` (default: auto-round's default, 200) and learning rate
  ``$LOWBIT_AUTOROUND_LR`` (default: auto-round's, 1/iters); both reported in the row. Its own
  "light" recipe is 50 iterations at lr 5e-3.
* Resume: a killed row continues at its first unfinished block, to the weights an uninterrupted
  run gives. auto-round's own resume (``AR_RESUME_DIR``) keeps the chain of block inputs but, for a
  model held in memory, not the tuned weights of finished blocks (it would leave them in float;
  its warning that resuming needs ``low_cpu_mem_usage`` is about that gap, and is dropped from the
  row's log because here the gap is filled) nor the random state
  that orders each block's batches; both are kept here per block (``_resumable``). Once tuning is
  done its weights are kept, so a row stopped while evaluating is not tuned again. All of it lives
  in the row's ``progress`` directory, which the comparison clears when the row's settings change
  (and which is cleared here too when iterations, learning rate, scheme or calibration differ).
* Precision: ``amp=False``, so tuning runs in float32. With auto-round's default ``amp=True`` it
  casts the *whole* model to bfloat16 in place (on CPU, and on GPU for a float32 model), which would also round the
  unquantized embeddings, norms and head and make the row incomparable with the others.
* Group size: ``None`` (per output channel) is auto-round's ``group_size=-1``. A group size that does
  not divide ``in_features`` (SmolLM2: 576 with 128) is auto-round's own behaviour: it zero-pads each
  row to a multiple of the group size, so the last group of a row holds the remainder (64 weights)
  with its own scale; the row reports the layers concerned (``ragged_groups``). A group larger than
  the row is one group per row.
* auto-round leaves int weight-only layers whose dimensions are not multiples of 32 in float; any
  decoder linear left unquantized makes the peer unavailable rather than a row with float layers.
* Afterwards the model is put back as it was apart from the weights: device, dtypes,
  ``requires_grad``, training mode, the attributes auto-round sets on modules (it leaves a patched
  ``forward`` on the first block), and the global state it touches (RNG seeds, print options,
  threads, grad mode, deterministic algorithms, ``CUBLAS_WORKSPACE_CONFIG``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lowbit.compare.config import WeightScheme
from lowbit.compare.peers import AUTOROUND_ITERS_ENV as ITERS_ENV
from lowbit.compare.peers import AUTOROUND_LR_ENV as LR_ENV
from lowbit.compare.peers import PeerUnavailable, decoder_linears
from lowbit.errors import LowbitError

MAX_BATCH = 8
log = logging.getLogger(__name__)


class _NoMetaWeightsWarning(logging.Filter):
    """Drops auto-round's warning that a resumed in-memory model has empty weights. It is logged on
    every run with ``AR_RESUME_DIR`` set, resumed or not, and ``_resumable`` puts the weights back
    when a run does resume, so in a lowbit row it is never true."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "AR_RESUME_DIR is set but neither" not in record.getMessage()


def _positive_env(name: str, parse: type, what: str) -> int | float | None:
    """A positive number from the environment, or None when unset (auto-round's default then)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = 0
    if not value > 0:
        raise LowbitError(f"{name} must be a positive {what}, got {raw!r}")
    return value


def _iters(default: int) -> int:
    iters = _positive_env(ITERS_ENV, int, "integer")  # iters=0 would switch auto-round to plain RTN
    return default if iters is None else iters


def _lr() -> float | None:
    return _positive_env(LR_ENV, float, "number")


def _restore_environ(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        _restore_environ(old)


def _rng_states() -> dict:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def _save_rng_states(path: Path) -> None:
    """The random states as tensors and JSON (safetensors): read back without unpickling anything."""
    from safetensors.torch import save_file

    states = _rng_states()
    version, mt, gauss = states["python"]
    kind, keys, pos, has_gauss, cached = states["numpy"]
    tensors = {"torch": states["torch"], "numpy_keys": torch.from_numpy(keys.astype("int64"))}
    tensors.update({f"cuda_{i}": t for i, t in enumerate(states["cuda"] or [])})
    meta = {"python": json.dumps([version, list(mt), gauss]), "numpy": json.dumps([kind, pos, has_gauss, cached]),
            "cuda": str(len(states["cuda"] or [])) if states["cuda"] is not None else "none"}
    save_file(tensors, str(path), metadata=meta)


def _load_rng_states(path: Path) -> dict:
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


def _set_rng_states(states: dict) -> None:
    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def _resumable(model: nn.Module, state: Path, settings: dict) -> Iterator[dict]:
    """auto-round's resume, made to give an uninterrupted run's weights (see the module docstring).

    Per finished block this keeps the block's weights and the random-number state (auto-round draws
    each block's batch order from Python's ``random``, so a resumed block must start from the state
    the previous block left), and gives auto-round's two chain tensors one file pair per block, so a
    kill while it writes them leaves the previous block's pair intact. Nothing is put back until
    auto-round has loaded its chain and so committed to resuming; a state that does not hold
    (files missing or unreadable, every block already done, other ``settings``) starts afresh.
    Yields ``{"earlier_seconds": s}``: the tuning time of the blocks an interrupted run finished.
    """
    from auto_round.utils.resume import ResumeState
    from safetensors.torch import load_file, save_file

    from lowbit.atomic import atomic_path, atomic_write_text

    meta = state / "settings.json"
    if meta.exists() and json.loads(meta.read_text()) != settings:
        shutil.rmtree(state)
    blocks, clock = state / "blocks", state / "seconds.json"
    blocks.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps(settings))
    load, mark, load_ids = ResumeState._load, ResumeState.mark_block_done, ResumeState.load_input_ids
    t0, kept = time.perf_counter(), {"earlier_seconds": 0.0}
    earlier = json.loads(clock.read_text()) if clock.exists() else {}

    def ours(name: str) -> tuple[Path, Path]:
        return blocks / f"{name}.safetensors", blocks / f"{name}.rng.safetensors"

    def chain_files(rs: ResumeState, index: int) -> None:
        rs.q_input_path = rs.dir / f"resume_q_input_{index:04d}.pt"
        rs.input_ids_path = rs.dir / f"resume_input_ids_{index:04d}.pt"

    def load_checked(self) -> None:
        load(self)
        done = self.completed_blocks
        if not done:
            return
        chain_files(self, len(done) - 1)
        ok = len(done) < len(self.block_names) and all(p.exists() for n in done for p in ours(n))
        try:
            ok = ok and torch.load(self.input_ids_path, map_location="cpu") is not None
            if ok and self.q_input_path.exists():
                torch.load(self.q_input_path, map_location="cpu")
        except Exception:  # noqa: BLE001 - an unreadable chain file means: start afresh
            ok = False
        if not ok:
            self.completed_blocks = []

    def restore_when_resuming(self):  # auto-round resumes once this returns its chain tensor
        ids = load_ids(self)
        if ids is not None and self.completed_blocks:
            for name in self.completed_blocks:
                model.get_submodule(name).load_state_dict(load_file(str(ours(name)[0])))
            last = self.completed_blocks[-1]
            _set_rng_states(_load_rng_states(ours(last)[1]))
            kept["earlier_seconds"] = earlier.get(last, 0.0)
            log.info("restored the tuned weights and random state of %d finished block(s) from %s",
                     len(self.completed_blocks), blocks)
        return ids

    def save_then_mark(self, name: str, *args) -> None:  # ours first: a block is done once the manifest says so
        weights, rng = ours(name)
        with atomic_path(weights) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.get_submodule(name).state_dict().items()},
                      str(tmp))
        with atomic_path(rng) as tmp:
            _save_rng_states(tmp)
        earlier[name] = kept["earlier_seconds"] + time.perf_counter() - t0  # the run's time up to this block
        atomic_write_text(clock, json.dumps(earlier))
        previous = (self.q_input_path, self.input_ids_path)
        chain_files(self, len(self.completed_blocks))
        mark(self, name, *args)
        for p in previous:
            Path(p).unlink(missing_ok=True)

    ResumeState._load, ResumeState.mark_block_done = load_checked, save_then_mark
    ResumeState.load_input_ids = restore_when_resuming
    untrue = _NoMetaWeightsWarning()
    logging.getLogger("autoround").addFilter(untrue)
    try:
        with _environ(AR_RESUME_DIR=str(state / "auto-round"), AR_WORK_SPACE=str(state / "work")):
            yield kept
    finally:
        ResumeState._load, ResumeState.mark_block_done, ResumeState.load_input_ids = load, mark, load_ids
        logging.getLogger("autoround").removeFilter(untrue)


@contextmanager
def _global_state_kept() -> Iterator[None]:
    """Undo what auto-round changes process-wide (it seeds every RNG and sets print options)."""
    print_opts = {k: getattr(torch._tensor_str.PRINT_OPTS, k)
                  for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
    rng = _rng_states()
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    determ = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    env = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    try:
        yield
    finally:
        torch.set_printoptions(**print_opts)
        _set_rng_states(rng)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.use_deterministic_algorithms(determ[0], warn_only=determ[1])
        _restore_environ(env)


def _ragged(linears: dict[str, nn.Linear], group: int) -> str | None:
    """Which layers auto-round quantizes with a shorter, zero-padded last group per row."""
    widths = sorted({lin.in_features for lin in linears.values() if 0 < group < lin.in_features
                     and lin.in_features % group})
    if not widths:
        return None
    count = sum(lin.in_features in widths for lin in linears.values())
    shapes = ", ".join(f"{w} = {w // group} x {group} + {w % group}" for w in widths)
    return f"{count}/{len(linears)} linears ({shapes}): last group per row zero-padded by auto-round"


def _max_levels(w: torch.Tensor, group: int) -> int:
    """Most distinct values in one group of ``w`` (groups along rows, the last one possibly shorter)."""
    most = 0
    for chunk in torch.split(w, group if group > 0 else w.shape[1], dim=1):
        s = chunk.float().sort(dim=1).values
        most = max(most, int(((s[:, 1:] != s[:, :-1]).sum(dim=1) + 1).max()))
    return most


def quantize(model: nn.Module, tok, calib: torch.Tensor | None, scheme: WeightScheme, run_dir: Path,
             variant: str = "autoround") -> dict:
    import auto_round
    from auto_round import AutoRound, QuantizationScheme, SignRoundConfig
    from auto_round.schemes import PRESET_SCHEMES

    preset = f"W{scheme.bits}A16"
    if preset not in PRESET_SCHEMES:
        raise PeerUnavailable(f"auto-round {auto_round.__version__} has no int preset for {scheme.bits} bits")
    if calib is None or calib.ndim != 2 or calib.shape[0] < 1:
        raise PeerUnavailable("auto-round needs calibration token ids of shape (n, seqlen)")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise PeerUnavailable(f"the adapter runs auto-round on one device, the model spans {sorted(map(str, devices))}")
    device = devices.pop()
    group = scheme.group_size or -1
    iters, lr_set = _iters(SignRoundConfig().iters), _lr()
    n, seqlen = calib.shape
    bs = min(MAX_BATCH, n)
    linears = decoder_linears(model)

    ids = calib.to(torch.long).cpu()
    dataset = [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones_like(ids[i:i + bs])} for i in range(0, n, bs)]
    # auto-round requires a tokenizer for a loaded model; it only reads its pad token from it here
    tokenizer = tok if tok is not None else SimpleNamespace(pad_token=None, pad_token_id=None)

    state, t0 = run_dir / "progress" / "autoround", time.perf_counter()
    settings = {"auto_round": auto_round.__version__, "scheme": str(scheme), "iters": iters, "lr": lr_set,
                "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    final = _finished(state, settings)
    if final is not None:  # tuned by an earlier run of this row (stopped while evaluating): its weights
        weights, extra = final
        for name, lin in linears.items():
            lin.weight.data.copy_(weights[name])
        return {**extra, "reused_tuning": True}

    attrs = {m: set(vars(m)) for m in model.modules()}
    tensors = [(t, t.dtype, t.requires_grad) for t in [*model.parameters(), *model.buffers()]]
    was_training = model.training
    try:
        with _global_state_kept(), _resumable(model, state, settings) as resumed:
            ar = AutoRound(
                model, tokenizer=tokenizer,
                scheme=QuantizationScheme.from_dict({**PRESET_SCHEMES[preset].to_dict(), "group_size": group}),
                alg_configs=SignRoundConfig(iters=iters, **({"lr": lr_set} if lr_set else {})),
                dataset=dataset, nsamples=n, seqlen=seqlen, batch_size=bs,
                device_map="cpu" if device.type == "cpu" else str(device),
                enable_torch_compile=False, amp=False,
            )
            ar.post_init()  # resolves the per-layer config, so that skipped layers are known before tuning
            layer_cfg = ar.layer_config or {}
            skipped = [name for name in linears if (layer_cfg.get(name) or {}).get("bits") != scheme.bits]
            if skipped:
                raise PeerUnavailable(f"auto-round would leave {len(skipped)} decoder linears in float "
                                      f"(e.g. {skipped[0]}; its int kernels need both dimensions divisible by 32)")
            lr = getattr(ar.quantize_config, "lr", None)
            out, _ = ar.quantize()
            if out is not model:
                raise PeerUnavailable("auto-round returned a new model instead of quantizing the given one in place")
    finally:  # put back everything but the weights
        for m, keys in attrs.items():
            for key in set(vars(m)) - keys:
                delattr(m, key)
        for t, dtype, requires_grad in tensors:
            if t.dtype != dtype:
                t.data = t.data.to(dtype)
            t.requires_grad_(requires_grad)
        model.to(device)
        model.train(was_training)

    after = decoder_linears(model)
    for name, lin in after.items():
        if linears.get(name) is not lin or type(lin) is not nn.Linear:
            raise PeerUnavailable(f"auto-round replaced {name} by {type(lin).__name__}")
    name, lin = next(iter(after.items()))
    levels = _max_levels(lin.weight.detach(), group)
    if levels > 2**scheme.bits:
        raise PeerUnavailable(f"auto-round left {name} off its grid ({levels} values in a group, > 2^{scheme.bits})")

    # stored bits: the codes and one float16 scale per group (symmetric: no zero), ragged last groups counted
    bits = sum(w.numel() * scheme.bits + w.shape[0] * -(-w.shape[1] // (scheme.group_size or w.shape[1])) * 16
               for w in (lin.weight for lin in after.values()))
    extra = {"peer_version": auto_round.__version__, "algorithm": "SignRound", "scheme": preset, "sym": True,
             "effective_bits": bits / sum(lin.weight.numel() for lin in after.values()), "iters": iters, "lr": lr,
             "nsamples": n, "seqlen": seqlen, "batch_size": bs, "earlier_seconds": resumed["earlier_seconds"],
             "amp": False, **({"ragged_groups": ragged} if (ragged := _ragged(linears, group)) else {})}
    _keep_finished(state, after, {**extra, "earlier_seconds": resumed["earlier_seconds"] + time.perf_counter() - t0})
    return extra


def _finished(state: Path, settings: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The tuned weights and row fields an earlier run of these ``settings`` kept, if any."""
    from safetensors.torch import load_file

    meta, weights, extra = state / "settings.json", state / "final.safetensors", state / "final.json"
    if not (weights.exists() and extra.exists() and meta.exists()) or json.loads(meta.read_text()) != settings:
        return None
    return load_file(str(weights)), json.loads(extra.read_text())


def _keep_finished(state: Path, linears: dict[str, nn.Linear], extra: dict) -> None:
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
