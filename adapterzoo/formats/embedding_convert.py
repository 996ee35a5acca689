"""Convert textual-inversion embeddings between A1111 `.pt`, kohya and diffusers files (FORMATS.md §4).

Every reader yields one `Embedding` (the vectors per text encoder plus A1111's bookkeeping) and every
writer serialises it, so vectors pass through bit for bit. A clip_l + clip_g pair (two text encoders) in
diffusers is the layout diffusers' own trainer writes: two files, OUT for text_encoder (clip_l) and OUT_2
for text_encoder_2 (clip_g). The base is the model family's whose text encoders take these widths.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.embedding.probe_embedding import embedding_base
from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.formats.io.pickle_safe import PICKLE_SUFFIXES, load_pickle
from adapterzoo.formats.io.probe_result import with_article
from adapterzoo.formats.io.safetensors_header import safetensors_errors
from adapterzoo.formats.probe import probe

EMBEDDING_TARGETS = ("a1111", "kohya", "diffusers")
SINGLE = "text_encoder"  # the one part of an embedding for one text encoder
PAIR_PARTS = ("clip_l", "clip_g")  # the parts of an embedding for CLIP-L and CLIP-G together
PAIR_WIDTHS = {"clip_l": 768, "clip_g": 1280}
A1111_STAR_TOKEN = 265  # CLIP's id of "*": A1111 writes it into every embedding
A1111_INFO = ("step", "sd_checkpoint", "sd_checkpoint_name")  # kept in safetensors metadata as strings


@dataclass
class Embedding:
    """One term: [n, dim] vectors per part ({"text_encoder"}, the pair {"clip_l", "clip_g"}, or ComfyUI's
    encoder slots with "t5xxl" beside them)."""

    parts: dict[str, torch.Tensor]
    name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pair(self) -> bool:
        return set(self.parts) == set(PAIR_PARTS)

    @property
    def vectors(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    @property
    def base(self) -> str:
        if SINGLE in self.parts:
            return embedding_base({"": self.parts[SINGLE].shape[-1]})
        return embedding_base({part: vectors.shape[-1] for part, vectors in self.parts.items()})


def _rows(tensor: Any, what: str) -> torch.Tensor:
    """A plain [n, dim] tensor of our own (1-D files hold one vector)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise BadFileError(f"{what} is not a vector or a [vectors, dim] matrix")
    tensor = tensor.detach().clone()
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def _pair(clip_l: Any, clip_g: Any, name: str | None, info: dict[str, Any]) -> Embedding:
    parts = {"clip_l": _rows(clip_l, "clip_l"), "clip_g": _rows(clip_g, "clip_g")}
    for part, tensor in parts.items():
        if tensor.shape[-1] != PAIR_WIDTHS[part]:
            raise BadFileError(f"{part} vectors are {PAIR_WIDTHS[part]} wide, not {tensor.shape[-1]}")
    if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
        raise BadFileError(
            f"clip_l has {parts['clip_l'].shape[0]} vectors but clip_g has {parts['clip_g'].shape[0]}; they must match"
        )
    return Embedding(parts, name, info)


def _load_tensors(path: Path, is_safetensors: bool) -> tuple[dict[str, Any], dict[str, str]]:
    if is_safetensors:
        with safetensors_errors(path), safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise BadFileError(f"pickle holds a {type(obj).__name__}, not a dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def _info_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    info: dict[str, Any] = {k: metadata[k] for k in A1111_INFO if k in metadata}
    if str(info.get("step", "")).isdigit():
        info["step"] = int(info["step"])
    return info


def _read_a1111(path: Path) -> Embedding:
    obj = load_pickle(path)
    params = obj["string_to_param"]
    if hasattr(params, "parameters"):  # the original textual_inversion repo's nn.ParameterDict
        params = params.parameters()
    if len(params) != 1:
        raise BadFileError(f"A1111 embedding holds {len(params)} terms; A1111 allows exactly one")
    vector = next(iter(params.values()))
    name = obj.get("name")
    info = {k: obj[k] for k in A1111_INFO if obj.get(k) is not None}
    return Embedding({SINGLE: _rows(vector, "string_to_param")}, None if name is None else str(name), info)


def _read_kohya(path: Path, is_safetensors: bool) -> Embedding:
    tensors, metadata = _load_tensors(path, is_safetensors)
    info, name = _info_from_metadata(metadata), metadata.get("name")
    if "emb_params" in tensors:
        return Embedding({SINGLE: _rows(tensors["emb_params"], "emb_params")}, name, info)
    return _pair(tensors["clip_l"], tensors["clip_g"], name, info)


def _diffusers_term(path: Path, is_safetensors: bool) -> tuple[str, torch.Tensor, dict[str, str]]:
    """The single {token: [n, dim]} term, or tokens `<tok>`, `<tok>_1`, ... stacked in order."""
    tensors, metadata = _load_tensors(path, is_safetensors)
    tokens = sorted(tensors, key=len)
    token = tokens[0]
    if len(tokens) == 1:
        return token, _rows(tensors[token], f"vector {token!r}"), metadata
    suffixed = {f"{token}_{i}" for i in range(1, len(tokens))}
    if set(tokens[1:]) != suffixed or any(tensors[t].dim() != 1 for t in tokens):
        names = ", ".join(tokens[:4])
        raise BadFileError(f"file holds {len(tokens)} separate terms ({names}); convert one term per file")
    ordered = [token] + [f"{token}_{i}" for i in range(1, len(tokens))]
    return token, torch.stack([tensors[t].detach() for t in ordered]), metadata


def pair_partner(path: Path) -> Path:
    """diffusers' trainer writes learned_embeds.safetensors (clip_l) and learned_embeds_2 (clip_g)."""
    return path.with_name(f"{path.stem}_2{path.suffix}")


def _read_diffusers(path: Path, is_safetensors: bool, partners: list[Path]) -> Embedding:
    token, vectors, metadata = _diffusers_term(path, is_safetensors)
    width = vectors.shape[-1]
    if width == PAIR_WIDTHS["clip_g"]:
        first = path.with_name(f"{path.stem[:-2]}{path.suffix}") if path.stem.endswith("_2") else None
        if first is None or not first.is_file():
            where = first.name if first else f"NAME{path.suffix} beside NAME_2{path.suffix}"
            raise BadFileError(
                f"{path.name} is the clip_g (text_encoder_2) half of a clip_l + clip_g embedding; "
                f"its clip_l half {where} is missing"
            )
        partners.append(first)
        _, clip_l, _ = _diffusers_term(first, probe(first).data_offset is not None)
        return _pair(clip_l, vectors, token, _info_from_metadata(metadata))
    second = pair_partner(path)
    if width == PAIR_WIDTHS["clip_l"] and second.is_file():
        _, clip_g, _ = _diffusers_term(second, probe(second).data_offset is not None)
        if clip_g.shape[-1] == PAIR_WIDTHS["clip_g"]:
            partners.append(second)
            return _pair(vectors, clip_g, token, _info_from_metadata(metadata))
    return Embedding({SINGLE: vectors}, token, _info_from_metadata(metadata))


def read_embedding(path: str | os.PathLike) -> tuple[Embedding, str, list[Path]]:
    """The embedding in any dialect, its format, and every file it was read from."""
    path = Path(path)
    found = probe(path)
    if found.kind != "embedding":
        raise BadFileError(f"{path.name} is {with_article(found.kind)}, not an embedding")
    is_safetensors = found.data_offset is not None
    sources = [path]
    if "t5xxl" in found.details.get("slots", {}):  # ComfyUI's per-encoder slots, each read as it is
        tensors, metadata = _load_tensors(path, is_safetensors)
        parts = {slot: _rows(tensors[slot], slot) for slot in found.details["slots"]}
        embedding = Embedding(parts, metadata.get("name"), _info_from_metadata(metadata))
    elif found.format == "a1111":
        embedding = _read_a1111(path)
    elif found.format == "kohya":
        embedding = _read_kohya(path, is_safetensors)
    else:
        embedding = _read_diffusers(path, is_safetensors, sources)
    return embedding, str(found.format), sources


def _metadata(name: str, info: dict[str, Any]) -> dict[str, str]:
    return {"name": name, **{k: str(v) for k, v in info.items()}}


def _save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], tmp: Path, dest: Path) -> None:
    """safetensors for .safetensors outputs; a weights-only torch pickle for .pt/.bin (both loaders read them)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if dest.suffix.lower() in PICKLE_SUFFIXES:
        torch.save(tensors, tmp)
    else:
        save_file(tensors, str(tmp), metadata=metadata)


def _check_suffix(dest: Path, to: str) -> None:
    suffix = dest.suffix.lower()
    if to == "a1111" and suffix not in PICKLE_SUFFIXES:
        raise AdapterzooError(f"A1111 embeddings are torch pickles; name the output .pt, not {dest.name}")
    if to != "a1111" and suffix not in PICKLE_SUFFIXES | {".safetensors"}:
        raise AdapterzooError(f"name the {to} output .safetensors (or .pt/.bin for a torch pickle), not {dest.name}")


def _a1111_dict(embedding: Embedding, name: str) -> dict[str, Any]:
    """What A1111's Embedding.save writes."""
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": embedding.parts[SINGLE].contiguous()},
        "name": name,
        "step": embedding.info.get("step", 0),
        "sd_checkpoint": embedding.info.get("sd_checkpoint"),
        "sd_checkpoint_name": embedding.info.get("sd_checkpoint_name"),
    }


def _outputs(embedding: Embedding, dest: Path, to: str) -> list[Path]:
    return [dest, pair_partner(dest)] if to == "diffusers" and embedding.is_pair else [dest]


def _write(embedding: Embedding, to: str, name: str, outputs: list[Path], temps: list[Path]) -> None:
    meta = _metadata(name, embedding.info)
    if to == "a1111":
        torch.save(_a1111_dict(embedding, name), temps[0])
    elif to == "kohya":
        tensors = dict(embedding.parts) if embedding.is_pair else {"emb_params": embedding.parts[SINGLE]}
        _save_tensors(tensors, meta, temps[0], outputs[0])
    else:
        for part, tmp, dest in zip(PAIR_PARTS if embedding.is_pair else (SINGLE,), temps, outputs):
            _save_tensors({name: embedding.parts[part]}, meta, tmp, dest)


def convert_embedding(
    src: str | os.PathLike, dest: str | os.PathLike, to: str, *, token: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Rewrite an embedding as `to`; `token` names the term (default: the source's own name, else its file stem)."""
    if to not in EMBEDDING_TARGETS:
        raise AdapterzooError(f"embeddings convert to {' | '.join(EMBEDDING_TARGETS)}, not {to!r}")
    src, dest = Path(src), Path(dest)
    _check_suffix(dest, to)
    embedding, source_format, sources = read_embedding(src)
    if "t5xxl" in embedding.parts:
        raise AdapterzooError(f"{src.name} holds a T5 (t5xxl) embedding for {embedding.base}; a1111, kohya and "
                              "diffusers embedding files have no T5 slot, so it cannot be converted to them")
    if to == "a1111" and embedding.is_pair:
        raise AdapterzooError("A1111 reads clip_l + clip_g embeddings in the kohya layout; use --to kohya")
    name = token or embedding.name or src.stem
    if not name.strip():
        raise AdapterzooError("the token must not be blank")
    outputs = _outputs(embedding, dest, to)
    for output in outputs:
        check_output(output, sources, force)
    with ExitStack() as stack:
        temps = [stack.enter_context(atomic_output(output)) for output in outputs]
        _write(embedding, to, name, outputs, temps)
    return {
        "input": str(src),
        "inputs": [str(p) for p in sources],
        "outputs": [str(p) for p in outputs],
        "kind": "embedding",
        "from": source_format,
        "to": to,
        "base": embedding.base,
        "vectors": embedding.vectors,
        "dims": {part: t.shape[-1] for part, t in embedding.parts.items()},
        "token": name,
    }
