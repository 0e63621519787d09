"""Perplexity and calibration on the user's own text: a .txt file is read as WikiText-2 is, a .jsonl as
C4 is, so the named sets' own files given by path give exactly the named sets' windows and samples."""

from __future__ import annotations

import shutil

import pytest
import torch

from lowbit.compare.config import CompareConfig
from lowbit.data import calibration, eval_windows
from lowbit.data.protocol import eval_text
from lowbit.data.sources import EMBEDDED, source_key, source_label
from lowbit.errors import LowbitError
from lowbit.recipes import Recipe


@pytest.fixture(scope="module")
def tok():
    from hostile_setup import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def own_files(tmp_path):
    """The named sets' own files, copied where a user would keep theirs."""
    shutil.copy(EMBEDDED / "wikitext-2-raw" / "wiki.test.raw", tmp_path / "wiki.txt")
    shutil.copy(EMBEDDED / "c4" / "c4-validation.00000-of-00008.head.jsonl", tmp_path / "val.jsonl")
    shutil.copy(EMBEDDED / "c4" / "c4-train.00000-of-01024.head.jsonl", tmp_path / "train.jsonl")
    return tmp_path


def test_a_named_sets_own_file_is_the_named_set(own_files, tok):
    assert eval_text(str(own_files / "wiki.txt")) == eval_text("wikitext2")
    assert eval_text(str(own_files / "val.jsonl")) == eval_text("c4")
    for path, name in ((own_files / "wiki.txt", "wikitext2"), (own_files / "val.jsonl", "c4")):
        assert torch.equal(eval_windows(str(path), tok, seqlen=256), eval_windows(name, tok, seqlen=256))


def test_calibration_from_a_file_samples_as_from_the_named_set(own_files, tok):
    assert torch.equal(calibration(str(own_files / "train.jsonl"), tok, n=4, seqlen=64, seed=3),
                       calibration("c4", tok, n=4, seqlen=64, seed=3))
    assert torch.equal(calibration(str(own_files / "wiki.txt"), tok, n=4, seqlen=64, seed=3, sampling="concat"),
                       calibration("wikitext2", tok, n=4, seqlen=64, seed=3))
    rec = Recipe.from_dict({"calibration": {"dataset": str(own_files / "train.jsonl")}})
    assert rec.calibration.dataset.endswith("train.jsonl")


def test_a_text_without_a_final_newline_keeps_its_last_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nlast line")
    assert eval_text(str(tmp_path / "a.txt")) == "first line\n\n\nlast line\n"


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "holds no text"),
    ("blank.txt", b"\n\n  \n", "holds no text"),
    ("binary.txt", b"\xff\xfe\x00\x01" * 10, "is not UTF-8 text"),
    ("notext.jsonl", b'{"txt": "x"}\n', "is not JSON lines with a 'text' field"),
    ("number.jsonl", b'{"text": 5}\n', "every 'text' field must be a string"),
])
def test_bad_text_files_are_refused_before_any_model(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LowbitError, match=message):
        eval_text(str(tmp_path / name))
    with pytest.raises(LowbitError, match=message):
        Recipe.from_dict({"calibration": {"dataset": str(tmp_path / name)}})


def test_a_text_shorter_than_one_window_is_one_error(tmp_path, tok):
    (tmp_path / "short.txt").write_text("only a few words\n")
    with pytest.raises(LowbitError, match="fewer than one window of 2048"):
        eval_windows(str(tmp_path / "short.txt"), tok, seqlen=2048)


def test_an_edited_file_is_a_new_set_in_the_compare_cache(tmp_path):
    (tmp_path / "mine.txt").write_text("one version\n")
    cfg = CompareConfig(model="x", recipes=["rtn-w4"], datasets=[str(tmp_path / "mine.txt")])
    before = cfg.protocol()
    (tmp_path / "mine.txt").write_text("another version\n")
    assert cfg.protocol() != before and source_key("wikitext2") == "wikitext2"
    assert source_label(str(tmp_path / "mine.txt")).startswith("mine-")
