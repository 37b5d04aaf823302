"""CLIP's BPE tokenizer built offline from the vocabulary file that PyPI packages ship.

OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (inside the ``clip-anytorch`` and ``open-clip-torch``
packages) holds the merges of the ViT-L/14 tokenizer, so ``build_clip_tokenizer()`` gives the same
49,408-token tokenizer as the hub's ``tokenizer/`` folder, without a download. Tests use it with fewer
merges for tiny text encoders.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from typing import Dict, List, Optional

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
FULL_MERGES = 48894  # 256 bytes × 2 + 48,894 merges + 2 special tokens = 49,408 tokens


def find_bpe_file() -> str:
    """The path of the BPE vocabulary inside an installed package (its module is not imported)."""
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(location, BPE_FILE)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"{BPE_FILE} was not found; install it with `pip install --no-deps clip-anytorch` "
        "(its dependencies are not needed to read the file)"
    )


def byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which CLIP's BPE works on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_vocab(bpe_path: Optional[str] = None, n_merges: int = FULL_MERGES) -> tuple[Dict[str, int], List[str]]:
    """CLIP's token → id table and its merges (the first ``n_merges`` of the file)."""
    with gzip.open(bpe_path or find_bpe_file()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : FULL_MERGES + 1][:n_merges]
    byte_tokens = list(byte_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(bpe_path: Optional[str] = None, n_merges: int = FULL_MERGES, max_length: int = 77):
    """A ``transformers.CLIPTokenizer``: the real ViT-L/14 one with the default ``n_merges``."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(bpe_path, n_merges)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length)


def build_byte_level_tokenizer(max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` without merges: every byte of a word is one token (514 ids,
    all below CLIP's vocabulary size). Not CLIP's tokenization; for models with random weights
    where the BPE file is not installed."""
    from transformers import CLIPTokenizer

    bytes_ = list(byte_to_unicode().values())
    tokens = bytes_ + [t + "</w>" for t in bytes_] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length)
