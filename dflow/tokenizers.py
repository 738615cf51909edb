"""Tokenizers built offline, for presets with random weights.

No model hub is needed: the T5/UMT5 tokenizer is a unigram model trained on the
docstrings of the Python standard library, and the CLIP tokenizer is rebuilt from
the byte-pair-encoding vocabulary that OpenAI published with CLIP (shipped in
``dflow/configs/tokenizers``, MIT licensed, taken from the ``open-clip-torch``
wheel).
"""

from __future__ import annotations

import ast
import gzip
import importlib
import json
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

CLIP_BPE_FILE = "clip-bpe-simple-vocab-16e6.txt.gz"
# CLIP keeps the first 48894 merges: 256 bytes x 2 + 48894 merges + 2 specials = 49408
CLIP_NUM_MERGES = 49152 - 256 - 2
CORPUS_MODULES = (
    "argparse",
    "asyncio.events",
    "collections",
    "concurrent.futures",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email.message",
    "functools",
    "http.client",
    "inspect",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "zipfile",
)


def _corpus() -> Iterator[str]:
    """Docstrings of standard-library modules and their public classes and functions.

    Read from the source files, not the live objects: what a process imported or
    patched before (torch replaces ``inspect.getfile``) must not change the
    vocabulary.
    """
    for name in CORPUS_MODULES:
        source = importlib.import_module(name).__file__ or ""
        tree = ast.parse(Path(source).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module) or (
                isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and not node.name.startswith("_")
            ):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


@cache
def _unigram_vocab(vocab_size: int) -> tuple[tuple[str, float], ...]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        # T5's ids: pad=0, eos=1, unk=2
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    vocab = json.loads(tokenizer.to_str())["model"]["vocab"]
    specials, pieces = vocab[:3], vocab[3:]
    # The trainer differs from run to run: its scores in their last bits, and the
    # characters it adds unlearned get the lowest score plus 1e-4 each, in hash-set
    # order. Rounded, with that bottom band tied and ties sorted by piece, every
    # process (each worker builds its own tokenizer) gets the same ids.
    floor = round(min(score for _, score in pieces), 6) + 0.01
    scored = [(piece, max(round(score, 6), floor)) for piece, score in pieces]
    scored.sort(key=lambda item: (-item[1], item[0]))
    return tuple((piece, float(score)) for piece, score in (*specials, *scored))


def t5_tokenizer(vocab_size: int = 1000, model_max_length: int = 512) -> T5Tokenizer:
    """A T5/UMT5-style sentencepiece-unigram tokenizer trained offline."""
    return T5Tokenizer(
        vocab=list(_unigram_vocab(vocab_size)),
        extra_ids=0,
        model_max_length=model_max_length,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = files("dflow.configs").joinpath("tokenizers", CLIP_BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # The first line is a version header.
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens), rebuilt from its BPE file."""
    vocab, merges = _clip_vocab_and_merges()
    # the tokenizers backend takes merges as pairs, whatever the annotation says
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]
        model_max_length=model_max_length,
    )


def build(kind: str, **options) -> T5Tokenizer | CLIPTokenizer:
    """Build the tokenizer a preset names: ``t5`` (also UMT5) or ``clip``."""
    if kind == "t5":
        return t5_tokenizer(**options)
    if kind == "clip":
        return clip_tokenizer(**options)
    raise ValueError(f"tokenizer kind must be 't5' or 'clip', got {kind!r}")
