"""Textual-inversion embeddings in ComfyUI's per-encoder slots (clip_l, clip_g, t5xxl) for the tiny DiT pipelines,
a tokenizer that follows T5's rules (no BOS, EOS 1, pad 0) without network, and the independent reference for an
embedding's effect on a prompt: each encoder's tokenizer extended by the new tokens (`add_tokens`, as diffusers'
`load_textual_inversion` names them: `tok`, `tok_1`, ...) and its input-embedding rows set to the vectors."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5TokenizerFast

T5_WORDS = ["a", "photo", "of", "cat", "red", "fox", "in", "the", "snow"]


def slot_embedding(path: Path, widths: dict[str, int], vectors: int = 2, seed: int = 0, scale: float = 1.0) -> Path:
    """A ComfyUI-style embedding file: one [vectors, width] tensor per encoder slot."""
    gen = torch.Generator().manual_seed(seed)
    save_file({slot: torch.randn(vectors, width, generator=gen) * scale for slot, width in widths.items()}, str(path))
    return path


def t5_tokenizer(length: int = 16) -> T5TokenizerFast:
    """A tiny T5 tokenizer built in memory: SentencePiece-style unigram pieces behind a Metaspace pre-tokenizer
    (prepend always, as the T5-XXL tokenizer Flux and SD3 ship), EOS appended, pad 0, EOS 1, unk 2, no BOS."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), (",", -3.0)]
    pieces += [(f"▁{word}", -1.0 - i / 10) for i, word in enumerate(T5_WORDS)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=length)


def added_tokens(word: str, vectors: int) -> list[str]:
    return [word] + [f"{word}_{i}" for i in range(1, vectors)]


def extend(tokenizer, encoder: torch.nn.Module, word: str, vectors: torch.Tensor) -> tuple[object, torch.nn.Module]:
    """Copies of `tokenizer` and `encoder` that know `word` as len(vectors) new tokens whose rows are `vectors`."""
    tokenizer, encoder = copy.deepcopy(tokenizer), copy.deepcopy(encoder)
    tokens = added_tokens(word, len(vectors))
    tokenizer.add_tokens([AddedToken(token, lstrip=True) for token in tokens])
    rows = encoder.get_input_embeddings().num_embeddings
    encoder.resize_token_embeddings(max(rows, len(tokenizer)))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, vector in zip(tokens, vectors):
            table[tokenizer.convert_tokens_to_ids(token)] = vector
    return tokenizer, encoder


def spelled_out(prompt: str, word: str, vectors: int) -> str:
    """The prompt as diffusers' maybe_convert_prompt writes it for a multi-vector token."""
    return prompt.replace(word, " ".join(added_tokens(word, vectors)))


@contextmanager
def extended_pipe(pipe, slots: dict[str, str], parts: dict[str, torch.Tensor], word: str) -> Iterator[None]:
    """`pipe` with each slot's text encoder and tokenizer swapped for their extended copies while inside."""
    saved = {}
    try:
        for slot, name in slots.items():
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            saved[name], saved[tokenizer_name] = getattr(pipe, name), getattr(pipe, tokenizer_name)
            tokenizer, encoder = extend(saved[tokenizer_name], saved[name], word, parts[slot])
            setattr(pipe, name, encoder)
            setattr(pipe, tokenizer_name, tokenizer)
        yield
    finally:
        for name, value in saved.items():
            setattr(pipe, name, value)


def reference_conditioning(pipe, slots: dict[str, str], parts: dict[str, torch.Tensor], word: str, prompt: str):
    """The family's prompt encoding with plain tokenizers: the encoders with a slot read the prompt spelling out
    the added tokens, the others the prompt without the word (what ComfyUI does with an embedding a slot lacks)."""
    without = " ".join(prompt.replace(word, " ").split())
    with extended_pipe(pipe, slots, parts, word):
        def ids(name: str, length: int | None = None) -> torch.Tensor:
            tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"))
            slot = next((s for s, n in slots.items() if n == name), None)
            text = spelled_out(prompt, word, len(parts[slot])) if slot else without
            return tokenizer(text, padding="max_length", max_length=length or tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids

        return pipe.encode_conditioning(prompt, ids)
