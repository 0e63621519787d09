"""The evaluation/calibration protocol on the real data files with SmolLM2's real tokenizer."""

import hashlib

import pytest
import torch

from lowbit.data import calibration, data_dir, eval_windows, wikitext2_test_rows
from lowbit.data.protocol import eval_text
from lowbit.errors import LowbitError

pytestmark = pytest.mark.skipif(data_dir() is None, reason="LOWBIT_DATA=hub: these check the local text")

WIKITEXT_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def test_wikitext_rows_follow_the_datasets_layout():
    raw = (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == WIKITEXT_SHA256
    rows = wikitext2_test_rows()
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"


def test_wikitext2_token_and_window_counts_are_exact(tok):
    # measured once with this tokenizer; peers under the same protocol report 148 windows
    ids = tok(eval_text("wikitext2")).input_ids
    assert len(ids) == 304986
    wins = eval_windows("wikitext2", tok)
    assert wins.shape == (148, 2048)
    assert torch.equal(wins.reshape(-1), torch.tensor(ids[: 148 * 2048]))
    assert eval_windows("wikitext2", tok, windows=40).shape == (40, 2048)


def test_c4_validation_is_capped_and_counted(tok):
    assert len(tok(eval_text("c4")).input_ids) == 520257
    assert eval_windows("c4", tok).shape == (254, 2048)  # 1025 local documents: fewer than 256 windows


def test_calibration_is_deterministic_and_follows_gptq_sampling(tok):
    a = calibration("c4", tok, n=4, seqlen=512, seed=0)
    b = calibration("c4", tok, n=4, seqlen=512, seed=0)
    c = calibration("c4", tok, n=4, seqlen=512, seed=1)
    assert a.shape == (4, 512) and torch.equal(a, b) and not torch.equal(a, c)
    # each sample is a contiguous slice of one training document
    from lowbit.data import c4_documents

    docs = [tok(d).input_ids for d in c4_documents("train")]
    for row in a.tolist():
        assert any(any(d[j : j + 512] == row for j in range(len(d) - 511)) for d in docs if len(d) > 512)


def test_calibration_pins_gptq_random_stream(tok):
    """Seed 0 draws documents and offsets exactly as GPTQ's get_c4 loop does (written out here)."""
    import random

    from lowbit.data import c4_documents

    docs = c4_documents("train")
    random.seed(0)
    expected = []
    for _ in range(3):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i]).input_ids
            if len(ids) > 256:
                break
        j = random.randint(0, len(ids) - 256 - 1)
        expected.append(ids[j : j + 256])
    assert calibration("c4", tok, n=3, seqlen=256, seed=0).tolist() == expected


def test_concat_sampling(tok):
    x = calibration("c4", tok, n=3, seqlen=4096, seed=0, sampling="concat")
    assert x.shape == (3, 4096)
    with pytest.raises(LowbitError, match="no c4 document is longer"):
        calibration("c4", tok, n=1, seqlen=10**6, seed=0)


def test_bos_per_window_for_gemma_style_models(tok):
    tok.bos_token = tok.eos_token  # SmolLM2 has no BOS of its own; borrow one for the test
    wins = eval_windows("wikitext2", tok, seqlen=64, windows=3, model_type="gemma3_text")
    assert torch.all(wins[:, 0] == tok.bos_token_id)
    plain = eval_windows("wikitext2", tok, seqlen=64, windows=3, model_type="llama")
    assert torch.equal(wins[0, 1:], plain.reshape(-1)[:63])


def test_embedded_text_is_the_protocols_text(monkeypatch, tmp_path):
    """With no data folder anywhere, the copy shipped in the package is read, and it is the same text."""
    from lowbit.data import sources

    shared = (wikitext2_test_rows(), sources.c4_documents("train"), sources.c4_documents("validation"))
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "CHECKOUT", tmp_path / "checkout")
    for cached in (sources.wikitext2_test_rows, sources.c4_documents):
        cached.cache_clear()
    try:
        assert sources.data_dir() == sources.EMBEDDED
        assert hashlib.sha256((sources.EMBEDDED / "wikitext-2-raw" / "wiki.test.raw").read_bytes()).hexdigest() \
            == WIKITEXT_SHA256
        embedded = (wikitext2_test_rows(), sources.c4_documents("train"), sources.c4_documents("validation"))
        assert embedded == shared
        assert [len(x) for x in embedded] == [4358, 1041, 1025]
    finally:
        for cached in (sources.wikitext2_test_rows, sources.c4_documents):
            cached.cache_clear()


def test_damaged_embedded_file_is_refused(monkeypatch, tmp_path):
    import shutil

    from lowbit.data import sources

    copy = tmp_path / "text"
    shutil.copytree(sources.EMBEDDED, copy)
    (copy / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = Robert Boulter = \n")
    monkeypatch.setattr(sources, "EMBEDDED", copy)
    monkeypatch.setenv("LOWBIT_DATA", str(copy))  # the folder is found; it is the embedded one that is checked
    sources.wikitext2_test_rows.cache_clear()
    try:
        with pytest.raises(LowbitError, match="is damaged"):
            wikitext2_test_rows()
    finally:
        sources.wikitext2_test_rows.cache_clear()


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    (b'{"txt": "no text field"}\n', "is not JSON lines with a 'text' field"),
    (b'{"text": "cut off', "is not JSON lines with a 'text' field"),
])
def test_bad_user_data_folder_is_one_error(monkeypatch, tmp_path, content, message):
    from lowbit.data import sources

    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-validation.00000-of-00008.head.jsonl").write_bytes(content)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    sources.c4_documents.cache_clear()
    try:
        with pytest.raises(LowbitError, match=message):
            sources.c4_documents("validation")
        with pytest.raises(LowbitError, match="no wikitext-2-raw/wiki.test.raw in the data folder"):
            sources.wikitext2_test_rows.__wrapped__()
    finally:
        sources.c4_documents.cache_clear()
