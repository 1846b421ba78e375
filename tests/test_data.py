import pytest
import torch

from sinkdlm import data

pytestmark = pytest.mark.skipif(
    not data.FORTUNES_DIR.is_dir(),
    reason=f"Debian text corpus not installed; run: {data.APT_INSTALL}",
)


def test_documents_are_clean_english():
    docs = data.load_documents()
    assert len(docs) > 5000
    for d in docs[::97]:
        assert d.isascii()
        assert "  " not in d and "\t" not in d
        assert "\n%\n" not in d
        assert data._is_prose(d)


def test_split_is_deterministic_disjoint_and_sized():
    docs = data.load_documents()
    train, val = data.split_documents(docs, 0.05)
    train2, val2 = data.split_documents(list(reversed(docs)), 0.05)
    assert set(val) == set(val2) and set(train) == set(train2)
    assert not set(train) & set(val)
    assert 0.03 < len(val) / len(docs) < 0.07


def test_tokenizer_roundtrip_and_specials(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path))
    docs = data.load_documents(("fortunes",))[:400]
    tok = data.train_tokenizer(docs, vocab_size=400)
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2]
    text = docs[3]
    assert tok.decode(tok.encode(text).ids) == text
    assert list(tmp_path.glob("tokenizer-*-v400.json"))  # cached
    again = data.train_tokenizer(docs, vocab_size=400)
    assert again.encode(text).ids == tok.encode(text).ids


def test_load_text_data_chunks(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path))
    d = data.load_text_data(seq_len=32, vocab_size=512, max_train_tokens=32 * 10)
    assert d.train.shape == (10, 32) and d.train.dtype == torch.int64
    assert d.val.shape[0] > 100 and d.val.shape[1] == 32
    assert int(d.train.max()) < d.vocab_size and int(d.train.min()) >= 0
    assert (d.train == d.mask_id).sum() == 0  # the mask token never occurs in text
    assert (d.train == d.eos_id).any()
    assert "_" in d.decode([d.mask_id]) and d.decode(d.val[0]).strip()


def test_missing_corpus_names_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "nope")
    with pytest.raises(data.CorpusMissingError, match="apt-get install"):
        data.load_documents()
