"""Apply a textual-inversion embedding at run time (FORMATS.md §4, SAMPLING.md §3).

The tokenizers and the token tables are left alone: in the ids of each text encoder the embedding has a slot
for (the family's `Sampling.embedding_slots`: CLIP-L, CLIP-G, T5), the prompt's token becomes that slot's n
placeholder ids (`denoise.token_ids`, through that encoder's own tokenizer, its special tokens and padding;
one id a vector, its own to each embedding, so several act in one prompt),
and a hook on the encoder's token embedding puts m·vectors there. An encoder without a slot reads the prompt
with the token taken out. So one pipeline verifies many embeddings, even several with the same name.
Multiplier 0 is the prompt without the token (the model without the file); 1 is the embedding as stored.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from adapterzoo.formats.embedding_convert import Embedding
from adapterzoo.formats.model.family import CLIP_EMBEDDING_SLOTS
from adapterzoo.verify.denoise import PLACEHOLDER_ID, Insert

TEXT_ENCODER = "text_encoder"


_free_ids = itertools.count()  # placeholder ids handed out so far: each embedding hooked gets ids of its own


def placeholder_ids(count: int) -> list[int]:
    """`count` placeholder ids no other embedding hooked in this process holds (several act in one prompt)."""
    return [PLACEHOLDER_ID - next(_free_ids) for _ in range(count)]


@dataclass
class AppliedEmbedding:
    token: str
    ids: dict[str, list[int]]  # text encoder -> the placeholder ids the token becomes in its tokens, one a vector
    encoders: tuple[str, ...] = ()  # every text encoder of the pipeline: those without vectors lose the token
    multiplier: float = 1.0
    calls: dict[str, int] = field(default_factory=dict)  # text encoder -> encodes that held the token
    _handles: list = field(default_factory=list)

    def insert(self) -> Insert:
        """What `denoise.token_ids` replaces, per text encoder: the token by its placeholders where vectors are
        hooked, by nothing elsewhere and at multiplier 0 (the model without the file)."""
        return {name: {self.token: self.ids.get(name, []) if self.multiplier else []} for name in self.encoders}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def slot_encoders(embedding: Embedding, slots: dict[str, str] | None,
                  encoders: dict[str, torch.nn.Module]) -> tuple[dict[str, str], list[str]]:
    """({slot: text encoder} for the slots that land on an encoder of this pipeline, the others with why)."""
    slots = CLIP_EMBEDDING_SLOTS if slots is None else slots
    found, missing = {}, []
    for part in embedding.parts:
        name = slots.get(part)
        if name is None:
            missing.append(f"{part} (this model reads no {part} text encoder)")
        elif encoders.get(name) is None:
            missing.append(f"{part} (the pipeline has no {name}: its {part} vectors act on nothing)")
        else:
            found[part] = name
    return found, missing


def width_problems(embedding: Embedding, landed: dict[str, str], encoders: dict[str, torch.nn.Module]) -> list[str]:
    """Each landed part's width must be its text encoder's; the reasons it is not."""
    problems = []
    for part, name in landed.items():
        vectors = embedding.parts[part]
        width = encoders[name].get_input_embeddings().embedding_dim
        if vectors.shape[-1] != width:
            problems.append(f"the {part} vectors are {vectors.shape[-1]} wide, {name} is {width}")
    return problems


def token_tables(encoder: torch.nn.Module) -> list[torch.nn.Embedding]:
    """Every embedding module that looks up the encoder's token table: T5 keeps `shared` beside the encoder's own
    `embed_tokens`, tied to the same weight, and calls only the latter."""
    weight = encoder.get_input_embeddings().weight
    return [m for m in encoder.modules() if isinstance(m, torch.nn.Embedding)
            and (m.weight is weight or m.weight.data_ptr() == weight.data_ptr())]


def apply_embedding(embedding: Embedding, token: str, landed: dict[str, str], encoders: dict[str, torch.nn.Module],
                    multiplier: float = 1.0) -> AppliedEmbedding:
    """Hook the token lookups of each encoder a part landed on (widths checked beforehand): the placeholder ids
    are swapped for a real one before the lookup, and their rows for m·vectors after it."""
    names = tuple(name for name in encoders if name.startswith(TEXT_ENCODER))
    ids = {name: placeholder_ids(embedding.parts[part].shape[0]) for part, name in landed.items()}
    applied = AppliedEmbedding(token, ids, names, multiplier)
    for part, name in landed.items():
        applied.calls[name] = 0
        for table in token_tables(encoders[name]):
            stored = embedding.parts[part].reshape(-1, table.embedding_dim).to(table.weight.device, table.weight.dtype)
            applied._handles += _hook(table, stored, ids[name], name, applied)
    return applied


def _hook(table: torch.nn.Embedding, stored: torch.Tensor, ids: list[int], name: str,
          applied: AppliedEmbedding) -> list:
    """Vector j goes where the ids held placeholder j; the ids are swapped for 0 before the lookup (its row is
    overwritten), so a table never reads an id it lacks."""
    mine = torch.tensor(ids)
    seen: list[torch.Tensor] = []  # per position: which vector (-1: none), from the ids before they are swapped

    def before(mod, inputs):
        found = inputs[0].unsqueeze(-1) == mine.to(inputs[0].device)
        which = torch.where(found.any(-1), found.int().argmax(-1), -1)
        seen[:] = [which]
        return (inputs[0].masked_fill(which >= 0, 0), *inputs[1:]) if bool((which >= 0).any()) else None

    def after(mod, inputs, output):
        which = seen.pop() if seen else None
        if which is None or not bool((which >= 0).any()):
            return None
        applied.calls[name] += 1
        output = output.clone()
        where = which >= 0
        output[where] = stored[which[where]] * applied.multiplier
        return output

    return [table.register_forward_pre_hook(before), table.register_forward_hook(after)]
