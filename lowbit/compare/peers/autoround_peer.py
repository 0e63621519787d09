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
  that orders each block's batches; both are kept here per block (``autoround_resume.resumable``). Once tuning is
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
import logging
import os
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
from lowbit.compare.peers.autoround_resume import finished, global_state_kept, keep_finished, resumable
from lowbit.errors import LowbitError

MAX_BATCH = 8
log = logging.getLogger(__name__)


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
    """Tune ``model``'s decoder linears in place with auto-round; returns the row's extra fields."""
    import auto_round
    from auto_round import SignRoundConfig

    device = _check_inputs(model, calib, scheme)
    iters, lr_set = _iters(SignRoundConfig().iters), _lr()
    ids = calib.to(torch.long).cpu()
    linears = decoder_linears(model)
    state, t0 = run_dir / "progress" / "autoround", time.perf_counter()
    settings = {"auto_round": auto_round.__version__, "scheme": str(scheme), "iters": iters, "lr": lr_set,
                "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    final = finished(state, settings)
    if final is not None:  # tuned by an earlier run of this row (stopped while evaluating): its weights
        weights, extra = final
        for name, lin in linears.items():
            lin.weight.data.copy_(weights[name])
        return {**extra, "reused_tuning": True}
    with _model_kept(model, device), global_state_kept(), resumable(model, state, settings) as resumed:
        lr = _tune(model, tok, ids, scheme, device, iters, lr_set, linears)
    after = _check_result(model, linears, scheme)
    extra = {**_row_fields(after, linears, scheme, ids, iters, lr), "earlier_seconds": resumed["earlier_seconds"]}
    keep_finished(state, after, {**extra, "earlier_seconds": resumed["earlier_seconds"] + time.perf_counter() - t0})
    return extra


def _check_inputs(model: nn.Module, calib: torch.Tensor | None, scheme: WeightScheme) -> torch.device:
    """What auto-round cannot take, as an unavailable peer; the model's one device."""
    import auto_round
    from auto_round.schemes import PRESET_SCHEMES

    if f"W{scheme.bits}A16" not in PRESET_SCHEMES:
        raise PeerUnavailable(f"auto-round {auto_round.__version__} has no int preset for {scheme.bits} bits")
    if calib is None or calib.ndim != 2 or calib.shape[0] < 1:
        raise PeerUnavailable("auto-round needs calibration token ids of shape (n, seqlen)")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise PeerUnavailable(f"the adapter runs auto-round on one device, the model spans {sorted(map(str, devices))}")
    return devices.pop()


def _tune(model: nn.Module, tok, ids: torch.Tensor, scheme: WeightScheme, device: torch.device, iters: int,
          lr_set: float | None, linears: dict[str, nn.Linear]) -> float | None:
    """auto-round's SignRound on ``ids`` in batches; returns the learning rate it used."""
    from auto_round import AutoRound, QuantizationScheme, SignRoundConfig
    from auto_round.schemes import PRESET_SCHEMES

    n, seqlen = ids.shape
    bs = min(MAX_BATCH, n)
    dataset = [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones_like(ids[i:i + bs])} for i in range(0, n, bs)]
    # auto-round requires a tokenizer for a loaded model; it only reads its pad token from it here
    tokenizer = tok if tok is not None else SimpleNamespace(pad_token=None, pad_token_id=None)
    preset = PRESET_SCHEMES[f"W{scheme.bits}A16"].to_dict()
    ar = AutoRound(
        model, tokenizer=tokenizer,
        scheme=QuantizationScheme.from_dict({**preset, "group_size": scheme.group_size or -1}),
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
    return lr


@contextmanager
def _model_kept(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Afterwards, everything but the weights as it was: attributes auto-round sets, dtypes, grads, device, mode."""
    attrs = {m: set(vars(m)) for m in model.modules()}
    tensors = [(t, t.dtype, t.requires_grad) for t in [*model.parameters(), *model.buffers()]]
    was_training = model.training
    try:
        yield
    finally:
        for m, keys in attrs.items():
            for key in set(vars(m)) - keys:
                delattr(m, key)
        for t, dtype, requires_grad in tensors:
            if t.dtype != dtype:
                t.data = t.data.to(dtype)
            t.requires_grad_(requires_grad)
        model.to(device)
        model.train(was_training)


def _check_result(model: nn.Module, linears: dict[str, nn.Linear], scheme: WeightScheme) -> dict[str, nn.Linear]:
    """The same nn.Linear modules, their weights on the scheme's grid."""
    after = decoder_linears(model)
    for name, lin in after.items():
        if linears.get(name) is not lin or type(lin) is not nn.Linear:
            raise PeerUnavailable(f"auto-round replaced {name} by {type(lin).__name__}")
    name, lin = next(iter(after.items()))
    levels = _max_levels(lin.weight.detach(), scheme.group_size or -1)
    if levels > 2**scheme.bits:
        raise PeerUnavailable(f"auto-round left {name} off its grid ({levels} values in a group, > 2^{scheme.bits})")
    return after


def _row_fields(after: dict[str, nn.Linear], linears: dict[str, nn.Linear], scheme: WeightScheme, ids: torch.Tensor,
                iters: int, lr: float | None) -> dict:
    import auto_round

    # stored bits: the codes and one float16 scale per group (symmetric: no zero), ragged last groups counted
    bits = sum(w.numel() * scheme.bits + w.shape[0] * -(-w.shape[1] // (scheme.group_size or w.shape[1])) * 16
               for w in (lin.weight for lin in after.values()))
    n, seqlen = ids.shape
    ragged = _ragged(linears, scheme.group_size or -1)
    return {"peer_version": auto_round.__version__, "algorithm": "SignRound", "scheme": f"W{scheme.bits}A16",
            "sym": True, "effective_bits": bits / sum(lin.weight.numel() for lin in after.values()), "iters": iters,
            "lr": lr, "nsamples": n, "seqlen": seqlen, "batch_size": min(MAX_BATCH, n), "amp": False,
            **({"ragged_groups": ragged} if ragged else {})}
