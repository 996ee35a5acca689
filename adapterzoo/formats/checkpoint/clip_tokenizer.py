"""Write the CLIP tokenizer folder a diffusers pipeline needs, offline.

vocab.json and merges.txt come from the user's Hugging Face cache (openai/clip-vit-large-patch14)
when present, else are built from the BPE merges shipped in `adapterzoo/data/` exactly the way
CLIP's SimpleTokenizer builds its vocabulary: the 256 byte symbols, the same with `</w>`, one token
per merge, then `<|startoftext|>` and `<|endoftext|>` (49408 tokens). Never the network.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from adapterzoo.errors import AdapterzooError

DATA = Path(__file__).resolve().parents[2] / "data"  # adapterzoo/data
BPE_FILE = DATA / "bpe_simple_vocab_16e6.txt.gz"
CACHE_REPO = "openai/clip-vit-large-patch14"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGE_COUNT = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file
MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte alphabet: printable bytes stand for themselves, the rest map to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _from_cache() -> tuple[Path, Path] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(CACHE_REPO, name) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(p, str) for p in found):
        return Path(found[0]), Path(found[1])
    return None


def _from_shipped_bpe() -> tuple[dict[str, int], list[str]]:
    if not BPE_FILE.is_file():
        raise AdapterzooError(
            f"no CLIP tokenizer: {BPE_FILE} is missing from the package and {CACHE_REPO} "
            "(vocab.json, merges.txt) is not in the Hugging Face cache"
        )
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : MERGE_COUNT + 1]
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def vocabulary() -> tuple[dict[str, int], list[str], str]:
    """CLIP's vocabulary and merges in memory (cache first, else the shipped BPE), and where they came from:
    what a tokenizer built without a folder on disk takes."""
    cached = _from_cache()
    if cached:
        vocab = json.loads(cached[0].read_text(encoding="utf-8"))
        lines = cached[1].read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        return vocab, merges, f"Hugging Face cache ({CACHE_REPO})"
    vocab, merges = _from_shipped_bpe()
    return vocab, merges, f"adapterzoo/data/{BPE_FILE.name}"


def special_tokens(pad_token: str) -> dict[str, str]:
    """The special tokens of CLIP's tokenizer with `pad_token` (see `write_clip_tokenizer`)."""
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}


def write_clip_tokenizer(folder: Path, pad_token: str) -> str:
    """Write vocab.json, merges.txt and the configs CLIPTokenizer reads; returns where the vocabulary came from.

    `pad_token` is `<|endoftext|>` for OpenAI CLIP-L and `!` (id 0) for the OpenCLIP encoders,
    which pad with zeros.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cached = _from_cache()
    if cached:
        shutil.copyfile(cached[0], folder / "vocab.json")
        shutil.copyfile(cached[1], folder / "merges.txt")
        origin = f"Hugging Face cache ({CACHE_REPO})"
    else:
        vocab, merges = _from_shipped_bpe()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        origin = f"adapterzoo/data/{BPE_FILE.name}"
    specials = special_tokens(pad_token)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return origin
