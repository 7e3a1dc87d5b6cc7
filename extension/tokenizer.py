"""The CLIP tokenizer, offline: built from the BPE vocabulary open_clip ships as a data file
(PyPI `open_clip_torch`, installed without its dependencies and never imported), so no hub
download is needed. The vocabulary is OpenAI's: the same ids as `openai/clip-vit-large-patch14`
and every SD1/SD2/SDXL text encoder."""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile

VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list:
    """GPT-2's reversible byte → printable-character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")  # finds the folder; imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLIP vocabulary comes from open_clip_torch; run setup.sh "
                           "(pip install --no-deps open_clip_torch==3.3.0)")
    return os.path.join(list(spec.submodule_search_locations)[0], BPE_FILE)


@functools.lru_cache(maxsize=1)
def tokenizer_files() -> str:
    """A folder with vocab.json and merges.txt in Hugging Face's CLIP layout."""
    with gzip.open(bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:VOCAB_SIZE - 256 * 2 - 2 + 1]
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    folder = tempfile.mkdtemp(prefix="netweave-clip-")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIPTokenizer, 77 tokens. SD1 pads with <|endoftext|>; SD2 and SDXL's second encoder
    (OpenCLIP) pad with "!" (id 0)."""
    from transformers import CLIPTokenizer

    folder = tokenizer_files()
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in every T5 vocabulary
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def t5_tokenizer(words, max_length: int = 32):
    """A T5 tokenizer (transformers' T5Tokenizer: Unigram with T5's special tokens and
    end-of-text template) over a closed vocabulary, built in code: each word one piece,
    lower-cased, anything else spelt letter by letter (other characters become <unk>). For the tiny T5
    encoders of the Flux demo and the tests; the real T5-XXL tokenizer (a 32128-piece
    SentencePiece model) is not in any installed package, so it cannot be had offline."""
    from transformers import T5Tokenizer

    vocab = [(t, 0.0) for t in T5_SPECIALS] + [("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    vocab += [(c, -8.0) for c in LETTERS]  # far less likely than a whole word
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    from tokenizers import normalizers
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()  # captions in any case
    return tok
