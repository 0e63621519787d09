"""OAC's output-adaptive Hessian: curvature of the model's output cross-entropy, one per layer.

The increase of the loss under a weight change is ``ΔL ≈ ½·δwᵀ·H_out·δw``; OAC approximates
``H_out`` by the empirical Fisher of per-sample gradients and assumes independence across layers
and across output rows, which leaves one ``d_in × d_in`` matrix per layer:

    H̄ = 1/(N·d_out) · Σ_n G_nᵀ·G_n,    G_n = ∂ℓ_n/∂W = δ_nᵀ·X_n  (d_out × d_in)

with ``ℓ_n`` the mean next-token cross-entropy of calibration sequence ``n`` (a batch of one),
``X_n`` the layer's inputs and ``δ_n`` the loss gradient at its outputs. ``G_n`` is formed from
those two in a backward hook and ``G_nᵀ·G_n`` added at once, so no layer's weight gradient is
ever stored, let alone all of them for all samples. Interpretations (METHODS.md marks them
uncertain): the normalisation ``1/(N·d_out)`` (it cancels in GPTQ's update but sets the scale
against which damping is relative — damping is relative to ``mean(diag H̄)`` here, so it cancels
too) and the per-sequence *mean* loss (a sum would scale every ``G_n`` by the same constant).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import weakref
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.atomic import atomic_path
from lowbit.memory import peak_memory_mb


class _Accumulator:
    def __init__(self, layer: nn.Linear):
        # float32 (float64 for a float64 model): a 7B model's sums are 28 GB in float32, twice that in
        # float64, and 128 per-sequence terms lose nothing a Hessian needs in float32
        dtype = torch.promote_types(layer.weight.dtype, torch.float32)
        self.sum = torch.zeros(layer.in_features, layer.in_features, dtype=dtype, device=layer.weight.device)
        self.d_out = layer.out_features
        self.inputs: torch.Tensor | None = None

    def add(self, grad_out: torch.Tensor) -> None:
        g = sample_weight_gradient(self.inputs, grad_out)
        self.sum += (g.T @ g).to(self.sum.dtype)
        self.inputs = None


def sample_weight_gradient(inputs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``∂ℓ/∂W = δᵀ·X`` of one sequence (``d_out × d_in``) from a linear layer's inputs and output
    gradient — autograd's weight gradient without ever asking autograd for it."""
    dtype = torch.promote_types(grad_out.dtype, torch.float32)  # bf16/fp16 gradients: products in fp32
    x = inputs.reshape(-1, inputs.shape[-1]).to(dtype)
    d = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
    return d.T @ x


def _state_meta(path: Path | None, names) -> dict | None:
    """What an earlier run of this pass saved at ``path`` (sequences done, cost), if it covers ``names``."""
    if path is None or not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"]) if set(names) <= set(f.keys()) else None


def _load_state(path: Path | None, accs: dict[str, _Accumulator]) -> tuple[int, dict]:
    """Sequences already summed by an interrupted pass (and its cost so far), if ``path`` covers ``accs``."""
    meta = _state_meta(path, accs)
    if meta is None:
        return 0, {}
    with safe_open(str(path), "pt") as f:
        for name, a in accs.items():  # one layer at a time: never a second copy of every sum
            a.sum.copy_(f.get_tensor(name))
    return meta["done"], meta


class StoredHessians:
    """Finished passes' Hessians, left in their state files and read one layer at a time as the
    rounding asks for them (``pop``), so that a split pass holds one pass's sums at most — on the
    CPU as well as on the device. ``scratch``: a directory of its own, removed with it."""

    def __init__(self, scratch: Path | None = None) -> None:
        self.files: dict[str, tuple[Path, float]] = {}  # layer → (file, divisor of its sum)
        if scratch is not None:
            weakref.finalize(self, shutil.rmtree, scratch, True)

    def add(self, path: Path, layers: dict[str, nn.Linear], n: int) -> None:
        self.files.update({name: (path, float(n * m.out_features)) for name, m in layers.items()})

    def pop(self, name: str) -> torch.Tensor:
        path, divisor = self.files.pop(name)
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name).div_(divisor)

    def __len__(self) -> int:
        return len(self.files)


def _save_state(path: Path, accs: dict[str, _Accumulator], done: int, seconds: float, peak: float) -> None:
    with atomic_path(path) as tmp:
        save_file({n: a.sum.cpu().contiguous() for n, a in accs.items()}, str(tmp),
                  metadata={"state": json.dumps({"done": done, "seconds": seconds, "peak_memory_mb": peak})})


def split_layers(layers: dict[str, nn.Linear], parts: int) -> list[dict[str, nn.Linear]]:
    """``layers`` in order, cut into at most ``parts`` runs of about equal ``d_in²`` (sum memory)."""
    sizes = [m.in_features**2 for m in layers.values()]
    total, out, acc = sum(sizes), [{}], 0
    for (name, m), size in zip(layers.items(), sizes):
        if out[-1] and acc >= total * len(out) / parts:
            out.append({})
        out[-1][name] = m
        acc += size
    return out


def output_adaptive_hessians(
    model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor, *, show_progress: bool = True,
    state: str | Path | None = None, save_every: int = 8, passes: int = 1, skip: Collection[str] = (),
) -> tuple[dict[str, torch.Tensor] | StoredHessians, dict[str, float]]:
    """``H̄`` for every layer in ``layers`` but those in ``skip``, from the sequences ``calib``
    (n, seqlen); and the cost.

    ``passes`` > 1 trades time for memory: the layers are split into that many runs, one gradient
    pass each, so that only one run's sums exist at a time. Finished runs stay in their ``state``
    files (``<stem>_<pass><suffix>``, a scratch directory without ``state``) and are read back
    layer by layer (``StoredHessians``). The Hessians equal one pass's: every pass runs the same
    forward and backward. ``skip`` (layers already rounded by an interrupted run) keep their place
    in the split, so that a resumed run's passes are the first run's and find their files.
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive integer, got {passes!r}")
    if passes == 1 or not layers:
        todo = {n: m for n, m in layers.items() if n not in skip}
        if not todo:
            return {}, {"seconds": 0.0, "peak_memory_mb": 0.0}
        return _one_pass(model, todo, calib, show_progress=show_progress, state=state, save_every=save_every)
    if state is None:
        scratch = Path(tempfile.mkdtemp(prefix="lowbit-oac-"))
        state, hessians = scratch / "oac_hessians.safetensors", StoredHessians(scratch)
    else:
        state, hessians = Path(state), StoredHessians()
    parts = split_layers(layers, passes)
    cost = {"seconds": 0.0, "peak_memory_mb": 0.0, "passes": len(parts)}
    n = calib.shape[0]
    for p, part in enumerate(parts):
        part = {name: m for name, m in part.items() if name not in skip}
        if not part:
            continue
        part_state = state.with_name(f"{state.stem}_{p}{state.suffix}")
        meta = _state_meta(part_state, part)
        if meta is not None and meta["done"] == n:  # finished by an earlier run: nothing to load yet
            c = {**meta, "resumed_at": n}
        else:
            _, c = _one_pass(model, part, calib, show_progress=show_progress, state=part_state,
                             save_every=save_every, desc=f"output-adaptive Hessians {p + 1}/{len(parts)}")
        hessians.add(part_state, part, n)
        cost["seconds"] += c["seconds"]
        cost["peak_memory_mb"] = max(cost["peak_memory_mb"], c["peak_memory_mb"])
        if "resumed_at" in c:  # sequences already summed, over all passes
            cost["resumed_at"] = cost.get("resumed_at", 0) + c["resumed_at"]
    return hessians, cost


def _one_pass(
    model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor, *, show_progress: bool,
    state: str | Path | None, save_every: int, desc: str = "output-adaptive Hessians",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One gradient pass over ``calib`` that sums ``GᵀG`` for ``layers``.

    The model's parameters are left untouched (no ``.grad`` is written): gradients flow from a
    leaf made of the input embeddings, and only activation gradients are computed. ``state``: a
    file that holds the running sums every ``save_every`` sequences and at the end, so that an
    interrupted pass (an hour for 128 sequences on a CPU) continues where it stopped; the caller
    keeps it tied to this model and calibration set (the pipeline's progress store does).
    """
    t0 = time.perf_counter()
    accs = {name: _Accumulator(m) for name, m in layers.items()}
    state = Path(state) if state is not None else None
    start, prior = _load_state(state, accs)
    device = next(model.parameters()).device
    handles = []

    def forward_hook(name: str):
        def hook(_module, args, out):
            accs[name].inputs = args[0].detach()
            out.register_hook(accs[name].add)

        return hook

    handles = [m.register_forward_hook(forward_hook(n)) for n, m in layers.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    n = calib.shape[0]

    def elapsed() -> float:  # over every run of this pass
        if start == n:  # read whole from its state: its cost is the run that made it, not this read
            return prior.get("seconds", 0.0)
        return prior.get("seconds", 0.0) + time.perf_counter() - t0

    def peak() -> float:
        return max(prior.get("peak_memory_mb", 0.0), peak_memory_mb())

    try:
        for i in tqdm(range(start, n), desc=desc, unit="seq", disable=not show_progress,
                      initial=start, total=n):
            ids = calib[i : i + 1].to(device)
            with torch.enable_grad():
                loss = model(ids, labels=ids, use_cache=False).loss
                loss.backward()
            if state is not None and ((i + 1) % save_every == 0 or i + 1 == n):
                _save_state(state, accs, i + 1, elapsed(), peak())
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    hessians = {name: a.sum.div_(n * a.d_out) for name, a in accs.items()}  # in place: no second copy of all
    return hessians, {"seconds": elapsed(), "peak_memory_mb": peak(), **({"resumed_at": start} if start else {})}
