"""The rows of a comparison as jobs with cache keys: a row is re-run only when what decides it changed."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lowbit.compare.config import CompareConfig, WeightScheme
from lowbit.errors import LowbitError

FP = "fp"


@dataclass(frozen=True)
class Job:
    kind: str  # "fp" (the full model), "recipe" or "peer"
    name: str  # the row's label
    spec: dict  # the resolved recipe, or {"peer": ..., "scheme": ...}

    def key(self, protocol: dict) -> str:
        """The row's cache key for ``CompareConfig.protocol()``; with ``quantization_protocol()``, the
        key of its quantized model alone."""
        from lowbit import __version__

        blob = json.dumps({"kind": self.kind, "spec": self.spec, "protocol": protocol, "lowbit": __version__},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)

    @property
    def needs_calibration(self) -> bool:
        if self.kind == "recipe":
            from lowbit.recipes import Recipe

            return Recipe.from_dict(self.spec).needs_calibration
        return self.kind == "peer"


def plan_jobs(cfg: CompareConfig) -> list[Job]:
    """The full model first, then every recipe (with the run's calibration set), then every peer."""
    import dataclasses

    from lowbit import recipes
    from lowbit.compare.peers import check_peer

    jobs, given = [Job(FP, FP, {})], {FP: ["the full model"]}
    for name in cfg.recipes:
        rec = recipes.apply_overrides(recipes.get(name), cfg.overrides)
        rec = rec.with_overrides(calibration=dataclasses.replace(rec.calibration, **cfg.calibration()))
        rec.validate()
        label = rec.name if Path(name).is_file() else name  # a recipe file's row: its own name, not its path
        jobs.append(Job("recipe", label, rec.to_dict()))
        given.setdefault(label, []).append(name)
    for text in cfg.peers:
        peer, _, scheme = text.partition("@")
        settings = check_peer(peer).settings()
        scheme = str(WeightScheme.parse(scheme or cfg.peer_scheme))
        spec = {"peer": peer, "scheme": scheme, **({"env": settings} if settings else {})}
        jobs.append(Job("peer", f"{peer}@{scheme}", spec))
        given.setdefault(jobs[-1].name, []).append(text)
    clashes = {label: sources for label, sources in given.items() if len(sources) > 1}
    if clashes:
        files = any(Path(s).is_file() for sources in clashes.values() for s in sources)
        hint = "; a recipe file's row takes the file's `name:`, so give one of them another name" if files else ""
        raise LowbitError("rows named twice: " + "; ".join(f"{label} (from {', '.join(sources)})"
                                                           for label, sources in clashes.items()) + hint)
    return jobs
