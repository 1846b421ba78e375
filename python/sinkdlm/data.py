"""Offline English text for training small diffusion LMs: Debian packages, cleaned and tokenised.

Sources are plain-text corpora that install from Debian without network access to anything else:
``fortunes`` (required; ~2.5 MB of quotations under /usr/share/games/fortunes) and ``jargon-text``
(optional; the Jargon File). The corpus is split into documents (one fortune, one jargon entry),
cleaned (ASCII art and offensive/rot13 files dropped, whitespace normalised), assigned to train or
validation by a hash of the document text (so the split never depends on file order), and
tokenised with a byte-level BPE trained offline with ``tokenizers`` and cached under
``$SINKDLM_CACHE`` (default ``~/.cache/sinkdlm``), keyed by the corpus hash and the vocabulary size.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

APT_INSTALL = "sudo apt-get install -y --no-install-recommends fortunes jargon-text"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
# Fortune files that are pictures or not English prose.
_FORTUNE_SKIP = {"art", "ascii-art", "translate-me"}
PAD_TOKEN, MASK_TOKEN, EOS_TOKEN = "<|pad|>", "<|mask|>", "<|eos|>"
SPECIAL_TOKENS = [PAD_TOKEN, MASK_TOKEN, EOS_TOKEN]


class CorpusMissingError(RuntimeError):
    """The Debian text packages are not installed; the message says what to run."""


def cache_dir() -> Path:
    """Cache directory for tokenizers and token chunks: ``$SINKDLM_CACHE`` or ~/.cache/sinkdlm."""
    root = os.environ.get("SINKDLM_CACHE") or Path.home() / ".cache" / "sinkdlm"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clean(text: str) -> str:
    # Collapse runs of spaces/tabs, keep line breaks single: prose, not layout.
    text = text.replace("\t", " ")
    lines = [re.sub(r" {2,}", " ", line).strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if line)
    return text.encode("ascii", "ignore").decode("ascii")


def _is_prose(doc: str) -> bool:
    if len(doc) < 20:
        return False
    letters = sum(c.isalpha() or c == " " for c in doc)
    return letters / len(doc) > 0.75  # drops ASCII art and tables


def _fortune_documents() -> list[str]:
    docs = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix or path.is_symlink() or path.name in _FORTUNE_SKIP or not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="ignore")
        docs.extend(_clean(d) for d in raw.split("\n%\n"))
    return docs


def _jargon_documents() -> list[str]:
    with gzip.open(JARGON_FILE, "rt", encoding="utf-8", errors="ignore") as f:
        raw = f.read()
    # Entries start with ":headword:" at the beginning of a line.
    return [_clean(":" + e) for e in re.split(r"\n:(?=[^\n:]+:)", raw)[1:]]


def load_documents(sources: tuple[str, ...] = ("fortunes", "jargon")) -> list[str]:
    """Cleaned English documents from the installed Debian packages, in a fixed order.

    ``fortunes`` is required; ``jargon`` is used when ``jargon-text`` is installed. Raises
    CorpusMissingError with the apt-get command when nothing is installed.
    """
    docs: list[str] = []
    if "fortunes" in sources:
        if not FORTUNES_DIR.is_dir():
            raise CorpusMissingError(
                f"{FORTUNES_DIR} not found: the demo trains on Debian's English text packages. "
                f"Install them with:\n    {APT_INSTALL}"
            )
        docs.extend(_fortune_documents())
    if "jargon" in sources and JARGON_FILE.is_file():
        docs.extend(_jargon_documents())
    docs = [d for d in docs if _is_prose(d)]
    if not docs:
        raise CorpusMissingError(f"no text found; install it with:\n    {APT_INSTALL}")
    return docs


def _in_validation(doc: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(doc.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < val_fraction


def split_documents(docs: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by a hash of each document's text."""
    train = [d for d in docs if not _in_validation(d, val_fraction)]
    val = [d for d in docs if _in_validation(d, val_fraction)]
    return train, val


def corpus_hash(docs: list[str]) -> str:
    """Short content hash of a document list (cache key)."""
    h = hashlib.sha1()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def train_tokenizer(docs: list[str], vocab_size: int = 2048):
    """Byte-level BPE (``tokenizers``) trained offline on ``docs``, cached on disk.

    The vocabulary starts with the special tokens <|pad|> (id 0), <|mask|> (id 1), <|eos|> (id 2).
    Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache_dir() / f"tokenizer-{corpus_hash(docs)}-v{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent runs never read a half-written file
    return tok


@dataclass
class TextData:
    """Tokenised corpus ready for training.

    train / val: int64 (N, seq_len) tensors of fixed-length chunks of the concatenated documents
    (documents separated by <|eos|>). ``tokenizer`` decodes ids; ``mask_id``/``pad_id``/``eos_id``
    are the special token ids.
    """

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: object
    mask_id: int
    pad_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def decode(self, ids) -> str:
        """Text of a 1-D id sequence (pad dropped, <|eos|> shown as ' | ', mask as '_')."""
        ids = [int(i) for i in ids]
        pieces, run = [], []
        for i in ids:
            if i == self.mask_id:
                pieces.append(self.tokenizer.decode(run))
                pieces.append("_")
                run = []
            elif i == self.eos_id:
                pieces.append(self.tokenizer.decode(run))
                pieces.append(" | ")
                run = []
            elif i != self.pad_id:
                run.append(i)
        pieces.append(self.tokenizer.decode(run))
        return "".join(pieces)


def _chunk(docs: list[str], tokenizer, seq_len: int, eos_id: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def load_text_data(
    seq_len: int = 64,
    vocab_size: int = 2048,
    val_fraction: float = 0.05,
    sources: tuple[str, ...] = ("fortunes", "jargon"),
    max_train_tokens: int | None = None,
) -> TextData:
    """Load, clean, split, tokenise and chunk the Debian English corpus (cached on disk).

    Returns TextData with ``train`` (N_train, seq_len) and ``val`` (N_val, seq_len) int64 chunks;
    ``max_train_tokens`` truncates the training chunks (the validation set is never truncated).
    """
    docs = load_documents(sources)
    train_docs, val_docs = split_documents(docs, val_fraction)
    tokenizer = train_tokenizer(train_docs, vocab_size)
    key = f"chunks-{corpus_hash(docs)}-v{vocab_size}-L{seq_len}-f{val_fraction}.pt"
    path = cache_dir() / key
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if path.is_file():
        chunks = torch.load(path)
    else:
        chunks = {
            "train": _chunk(train_docs, tokenizer, seq_len, eos_id),
            "val": _chunk(val_docs, tokenizer, seq_len, eos_id),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(chunks, tmp)
        tmp.replace(path)
    train = chunks["train"]
    if max_train_tokens is not None:
        train = train[: max(1, max_train_tokens // seq_len)]
    return TextData(
        train=train,
        val=chunks["val"],
        tokenizer=tokenizer,
        mask_id=tokenizer.token_to_id(MASK_TOKEN),
        pad_id=tokenizer.token_to_id(PAD_TOKEN),
        eos_id=eos_id,
    )
