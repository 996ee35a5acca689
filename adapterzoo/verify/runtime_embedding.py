"""Apply a textual-inversion embedding at run time (FORMATS.md §4, SAMPLING.md §3).

The tokenizer and the token table are left alone: the prompt's token becomes n placeholder ids
(`denoise.token_ids`), and a hook on each text encoder's token embedding puts m·vectors there. So
one pipeline verifies many embeddings, even several with the same name. Multiplier 0 is the prompt
without the token (the model without the file); 1 is the embedding as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapterzoo.formats.embedding_convert import PAIR_PARTS, SINGLE, Embedding
from adapterzoo.verify.denoise import PLACEHOLDER_ID

ENCODER_OF_PART = {SINGLE: "text_encoder", PAIR_PARTS[0]: "text_encoder", PAIR_PARTS[1]: "text_encoder_2"}


@dataclass
class AppliedEmbedding:
    token: str
    vectors: int
    multiplier: float = 1.0
    calls: dict[str, int] = field(default_factory=dict)  # text encoder -> encodes that held the token
    _handles: list = field(default_factory=list)

    def insert(self) -> dict[str, int]:
        """What `denoise.token_ids` replaces: the token by n placeholders, or nothing at multiplier 0."""
        return {} if self.multiplier == 0 else {self.token: self.vectors}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def width_problems(embedding: Embedding, encoders: dict[str, torch.nn.Module]) -> list[str]:
    """Each part's width must be its text encoder's; the reasons it is not."""
    problems = []
    for part, vectors in embedding.parts.items():
        encoder = encoders.get(ENCODER_OF_PART[part])
        if encoder is None:
            problems.append(f"the embedding has a {part} part but the checkpoint has no {ENCODER_OF_PART[part]}")
            continue
        width = encoder.get_input_embeddings().embedding_dim
        if vectors.shape[-1] != width:
            problems.append(f"the {part} vectors are {vectors.shape[-1]} wide, {ENCODER_OF_PART[part]} is {width}")
    return problems


def apply_embedding(embedding: Embedding, token: str, encoders: dict[str, torch.nn.Module],
                    multiplier: float = 1.0) -> AppliedEmbedding:
    """Hook the token embedding of each encoder the file has vectors for (widths checked beforehand)."""
    applied = AppliedEmbedding(token, embedding.vectors, multiplier)
    for part, vectors in embedding.parts.items():
        name = ENCODER_OF_PART[part]
        table = encoders[name].get_input_embeddings()
        stored = vectors.reshape(-1, table.embedding_dim).to(table.weight.device, table.weight.dtype)
        applied.calls[name] = 0

        def hook(mod, inputs, output, name=name, stored=stored):
            where = inputs[0] == PLACEHOLDER_ID
            if not where.any() or applied.multiplier == 0:
                return None
            applied.calls[name] += 1
            output = output.clone()
            for row in range(where.shape[0]):
                positions = where[row].nonzero().flatten()
                repeats = -(-len(positions) // len(stored))
                output[row, positions] = (stored.repeat(repeats, 1)[: len(positions)] * applied.multiplier)
            return output

        applied._handles.append(table.register_forward_hook(hook))
    return applied
