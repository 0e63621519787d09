"""QuaRot's residual-stream rotation, folded into the weights (lowbit.surgery.rotation, issue 32 item 1)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_family

from lowbit.errors import LowbitError
from lowbit.models import find_blocks
from lowbit.surgery.rotation import rotate_residual, rotation_matrix


def _stream_absmax_ratio(model, ids) -> float:
    """max |x| / rms(x) of block 1's input: how far one channel stands out of the residual stream."""
    _, blocks = find_blocks(model)
    seen = []
    hook = blocks[1].register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    hook.remove()
    x = seen[0].double()
    return float(x.abs().max() / x.pow(2).mean().sqrt())


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_the_rotated_model_computes_the_same_function(family, kind):
    """The rotated model's logits equal the original's: in float64, but transformers' RMSNorm computes in float32
    whatever the model's dtype, so to float32 rounding (the tiny models' stream is 64 wide, a power of two;
    SmolLM2's 576 is not: the slow test)."""
    model = tiny_family(family).double()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    q = rotate_residual(model, kind, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    _, blocks = find_blocks(model)
    assert all(torch.equal(b.input_layernorm.weight, torch.ones_like(b.input_layernorm.weight)) for b in blocks)


def test_a_tied_head_is_untied_and_rotation_is_seeded():
    model = tiny_family("llama").double()  # ties its head to the embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rotate_residual(model, "hadamard", seed=0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert not model.config.tie_word_embeddings
    assert torch.equal(rotation_matrix("hadamard", 64, 5), rotation_matrix("hadamard", 64, 5))
    assert not torch.equal(rotation_matrix("hadamard", 64, 5), rotation_matrix("hadamard", 64, 6))


def test_rotation_spreads_an_outlier_channel():
    """A channel that stands out of the stream (as real models' massive activations do) is spread by ``Q``."""
    model = tiny_family("llama").double()
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 7] *= 40  # one loud channel in every token
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    loud = _stream_absmax_ratio(model, ids)
    rotate_residual(model, "hadamard", seed=0)
    assert _stream_absmax_ratio(model, ids) < loud / 3, (loud, _stream_absmax_ratio(model, ids))


@pytest.mark.parametrize("family,match", [("gemma3", "RMSNorm blocks that scale by their weight|pre-norm"),
                                          ("opt", "RMSNorm"), ("gpt2", "RMSNorm"),
                                          ("mixtral", "mixture-of-experts")])
def test_families_it_cannot_fold_are_one_line_errors(family, match):
    model = tiny_family(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LowbitError, match=match) as err:
        rotate_residual(model)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any change


def _small(name: str):
    import lowbit

    return lowbit.recipes.get(name).with_overrides("calibration.nsamples=4", "calibration.seqlen=32")


@pytest.mark.parametrize("name", ["quarot-w4", "quarot-w4a4"])
def test_a_rotated_run_saves_and_reloads(name, calib_ids, tmp_path):
    """The pipeline rotates first (every stage sees the rotated model); the checkpoint holds the folded weights
    and reloads to the logits of the model that was evaluated in memory."""
    import lowbit
    from lowbit.export.load import load_quantized

    model = tiny_family("llama")
    result = lowbit.quantize(model, _small(name), calib_ids, show_progress=False)
    assert not model.config.tie_word_embeddings  # the head took the final norm's scale: untied
    lowbit.save(result, tmp_path / "ckpt")
    loaded, _ = load_quantized(tmp_path / "ckpt")
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_rotation_leaves_other_recipes_as_they_were():
    """A recipe without rotation keeps its identity (resume and comparison cache keys); --onload is refused."""
    import lowbit

    assert "rotation" not in lowbit.recipes.get("gptq-w4").to_dict()
    assert lowbit.recipes.get("quarot-w4").to_dict()["rotation"] == {"kind": "hadamard", "seed": 0}
    with pytest.raises(LowbitError, match="rotation.kind"):
        lowbit.recipes.get("gptq-w4").with_overrides("rotation.kind=givens")


@pytest.mark.slow
def test_smollm2_rotated_computes_the_same_function(smollm2):
    """The real model (a 576-wide stream: Hadamard ⊗ a 9×9 random orthogonal): the same logits to float32
    rounding, the same next tokens."""
    model, tok = smollm2
    model = __import__("copy").deepcopy(model)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        rotate_residual(model, "hadamard", seed=0)
        after = model(ids).logits
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    torch.testing.assert_close(after, before, rtol=0, atol=5e-4)  # logits up to ~30: float32 rounding


@pytest.mark.parametrize("fmt", ["dense", "compressed-tensors"])
def test_a_rotated_checkpoint_exports_and_plain_transformers_gives_its_logits(fmt, calib_ids, tmp_path):
    """The rotation is folded into ordinary weights (and an untied head): the exported model needs no lowbit code
    to compute what lowbit's does."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import lowbit
    from lowbit.export.formats import export_checkpoint

    model = tiny_family("llama")
    lowbit.save(lowbit.quantize(model, _small("quarot-w4"), calib_ids, show_progress=False), tmp_path / "ckpt")
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / fmt, fmt)
    # asymmetric zero points load through compressed-tensors' dequantizing path (README: Serve it)
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if fmt == "compressed-tensors" else {}
    plain = AutoModelForCausalLM.from_pretrained(out, **extra)
    ref, _ = lowbit.load_model(tmp_path / "ckpt")
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_killed_rotated_run_resumes_to_the_same_model(calib_ids, tmp_path, monkeypatch):
    """The rotation is not stored: a resumed run rotates the float model again from the seed, replays the stored
    blocks, and ends with the uninterrupted run's codes and logits."""
    from conftest import interrupt_rounding_in_block

    from lowbit.pipeline import quantize_model

    recipe = _small("quarot-w4")
    full = quantize_model(tiny_family("llama"), recipe, calib_ids, show_progress=False)
    with monkeypatch.context() as m:
        interrupt_rounding_in_block(m, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(tiny_family("llama"), recipe, calib_ids, progress_dir=tmp_path, show_progress=False)
    resumed = quantize_model(tiny_family("llama"), recipe, calib_ids, progress_dir=tmp_path, resume=True,
                             show_progress=False)
    assert resumed.report.resumed_blocks == 1
    assert all(torch.equal(resumed.weights[n].codes, qw.codes) for n, qw in full.weights.items())
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        assert torch.equal(resumed.model(ids).logits, full.model(ids).logits)


def test_rotation_with_onload_is_one_line(tmp_path):
    """Block-by-block quantization never holds the whole model, which the rotation folds into at once."""
    import lowbit
    from lowbit.api import quantize_to_disk

    model = tiny_family("llama")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(LowbitError, match="rotation folds into the whole model at once: quantize without --onload"):
        quantize_to_disk(tmp_path / "model", lowbit.recipes.get("quarot-w4"), tmp_path / "out",
                         calib=torch.zeros(4, 32, dtype=torch.long), show_progress=False)
