"""The parts a transformer-only checkpoint lacks, from files and folders the user names (`--text-encoders`,
`--vae`): each is recognised by its tensors (`formats.checkpoint.part_files`), put in the slot of the family's
pipeline its class fits (where two slots share a class, as SD3's CLIP-L and CLIP-G, by its width: the family's
`part_widths`, else the relative widths of the files given), built on `meta` and loaded with `assign=True` (no
temporary folder).

Tokenizers: a single text-encoder file carries none. Its tokenizer comes from the folder the encoder came from
(the folder itself, or the diffusers `tokenizer*` folder beside it), else from `--pipeline DIR`, else — for a
CLIP tokenizer — from the CLIP vocabulary that ships with adapterzoo (as for SD single files); anything else is
named in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.checkpoint.clip_tokenizer import MAX_LENGTH, special_tokens, vocabulary
from adapterzoo.formats.checkpoint.part_files import PROJECTION, PartFile, recognise, vae_config
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model import vae_names
from adapterzoo.formats.model.family import Family
from adapterzoo.formats.model.on_meta import parameters_on_meta

TEXT_ENCODER = "text_encoder"
IGNORED = ("position_ids", "logit_scale")  # buffers and training leftovers some CLIP files carry
FP8_MARKER = "scaled_fp8"  # ComfyUI's scaled-fp8 files carry it
FP8_EXTRAS = ("scale_weight", "scale_input", "input_scale")  # per-tensor scales beside a weight (applied, or unused)
VAE_INSIDE = "first_stage_model."  # a single file's own VAE, as LDM and SAI checkpoints keep it
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


def tokenizer_slot(encoder_slot: str) -> str:
    return encoder_slot.replace(TEXT_ENCODER, "tokenizer")


def encoder_slots(family: Family) -> dict[str, str]:
    """The family's text-encoder slots and their classes, in its order (required, then optional)."""
    spec = family.sampling
    return {name: cls for name, (_, cls) in (spec.parts | spec.optional).items() if name.startswith(TEXT_ENCODER)}


def _fits(file_class: str, slot_class: str, lone: bool) -> bool:
    """A CLIP with a projection also serves a slot that reads no projection (the projection is left out); a lone
    CLIP file without one serves a slot that reads one, with the identity (SD3's CLIP-L: SAI's clip_l.safetensors
    has no `text_projection.weight`, SAI's reference pools it unprojected, diffusers' single-file loader and
    ComfyUI fill `torch.eye`)."""
    pair = (file_class, slot_class)
    return (file_class == slot_class or pair == ("CLIPTextModelWithProjection", "CLIPTextModel")
            or (lone and pair == ("CLIPTextModel", "CLIPTextModelWithProjection")))


@dataclass(frozen=True)
class _Given:
    """One --text-encoders entry before it is loaded: a file (its `part`) or a folder (its class's library)."""

    path: Path
    model_class: str
    width: int | None
    part: PartFile | None = None
    library: str = "transformers"


def _wanted(family: Family) -> str:
    """The text-encoder slots as a message lists them: 'text_encoder (CLIPTextModelWithProjection, 768 wide), ...'."""
    widths = family.sampling.part_widths
    return ", ".join(f"{n} ({c}{f', {widths[n]} wide' if n in widths else ''})"
                     for n, c in encoder_slots(family).items())


def _assign_slots(family: Family, given: list[_Given]) -> list[str]:
    """The slot of each given encoder. What says its own slot goes there first: a diffusers component folder named
    as one, a class only one slot takes, a width only one slot declares (`part_widths`: SD3's CLIP-L 768, CLIP-G
    1280). The rest, of a class two slots share and a width none declares (a tiny or unusual model), go by
    relative width: the narrowest into the slot declared narrowest (CLIP-L is narrower than CLIP-G), so two files
    land alike in either order; one such file alone takes the first slot still free."""
    slots = encoder_slots(family)
    widths = family.sampling.part_widths
    placed: dict[int, str] = {}
    taken: dict[str, Path] = {}

    def fitting(entry: _Given) -> list[str]:
        return [n for n, c in slots.items() if _fits(entry.model_class, c, entry.part is not None)]

    def claim(index: int, slot: str) -> None:
        if slot in taken:
            raise AdapterzooError(f"--text-encoders {given[index].path.name}: {taken[slot].name} already gives "
                                  f"{slot}; a {family.title} pipeline takes {_wanted(family)}")
        placed[index], taken[slot] = slot, given[index].path

    for index, entry in enumerate(given):
        fit = fitting(entry)
        if not fit:
            width = f" {entry.width} wide" if entry.width else ""
            raise AdapterzooError(f"--text-encoders {entry.path.name}: a {entry.model_class}{width} does not fit a "
                                  f"{family.title} pipeline, which takes {_wanted(family)}")
        own = ([n for n in fit if entry.part is None and n == entry.path.name]
               or [n for n in fit if entry.width is not None and widths.get(n) == entry.width]
               or (fit if len(fit) == 1 else []))
        if own:
            claim(index, own[0])
    for index in sorted((i for i in range(len(given)) if i not in placed), key=lambda i: given[i].width or 0):
        fit = fitting(given[index])
        free = sorted((n for n in fit if n not in taken), key=lambda n: widths.get(n, 0))
        claim(index, free[0] if free else fit[0])
    return [placed[i] for i in range(len(given))]


def _tensors(path: Path, part: PartFile, dtype: torch.dtype, beside: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The part's tensors in `dtype`, prefix stripped, and the keys `beside` it as they are (a CLIP's
    `text_projection.weight` next to `text_model.`); ComfyUI's scaled fp8 (`t5xxl_fp8_e4m3fn_scaled`: a
    `scale_weight` beside each fp8 weight, a `scaled_fp8` marker) dequantized as weight × scale."""
    source = open_checkpoint_file(path)
    state = {}
    for key in source.shapes:
        if key in beside:
            name = key
        elif not key.startswith(part.prefix) or key.endswith(FP8_EXTRAS) or key == FP8_MARKER:
            continue
        else:
            name = key[len(part.prefix):]
        tensor = source.get(key)
        scale = key.removesuffix("weight") + "scale_weight"
        if key.endswith(".weight") and scale in source.shapes:
            tensor = tensor.float() * source.get(scale).float()
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> torch.nn.Module:
    expected = set(model.state_dict())
    extra = [k for k in state if k not in expected and not k.endswith(IGNORED) and k != PROJECTION]
    missing = sorted(expected - set(state))
    if extra or missing:
        problem = f"no {missing[0]}" if missing else f"{extra[0]} has no place in it"
        raise BadFileError(f"{path.name}: not a whole {what} ({problem}; {len(missing)} missing, {len(extra)} extra)")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    return model


def _text_encoder_file(path: Path, part: PartFile, slot_class: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    model_class = getattr(transformers, slot_class)
    config = dict(part.config)
    identity = slot_class == "CLIPTextModelWithProjection" and "projection_dim" not in config
    if identity:
        config["projection_dim"] = part.width
    with parameters_on_meta():
        model = model_class(model_class.config_class(**config))
    state = _tensors(path, part, dtype, beside=(PROJECTION,))
    if identity:
        state[PROJECTION] = torch.eye(part.width, dtype=dtype)
    if part.model_class.startswith("CLIP"):  # the tower under `text_model.` where the model keeps it there
        inner = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
        state = {k if k == PROJECTION else inner + k: v for k, v in state.items()}
    if part.model_class == "T5EncoderModel":  # the token embedding is stored once, under either of its tied names
        for name, twin in (("shared.weight", "encoder.embed_tokens.weight"),
                           ("encoder.embed_tokens.weight", "shared.weight")):
            if name in state and twin not in state:
                state[twin] = state[name]
    return _assign(model, state, path, slot_class).eval()


def _vae_file(path: Path, part: PartFile, family: Family, dtype: torch.dtype) -> torch.nn.Module:
    """An AutoencoderKL of the file's VAE tensors (under `part.prefix`), its latent factors the family's."""
    from diffusers import AutoencoderKL

    source = open_checkpoint_file(path)
    if part.ldm:
        config = vae_config(part, source.shapes, family.sampling.vae_config.get("sample_size", 1024),
                            family.sampling.vae_config)
        levels = len(config["down_block_types"])
        state = {}
        for key, tensor in _tensors(path, part, dtype).items():
            name = vae_names.ldm_to_diffusers_vae(key, levels)
            if name is None:
                raise BadFileError(f"--vae {path.name}: VAE tensor {key} has no place in a diffusers AutoencoderKL")
            state[name] = tensor.reshape(tensor.shape[:2]) if vae_names.is_attention_weight(key) and tensor.dim() == 4 \
                else tensor
    else:
        beside = path.with_name("config.json")
        if not beside.is_file():
            raise AdapterzooError(f"--vae {path.name}: a VAE in diffusers names needs its config.json beside it "
                                  "(or give its folder)")
        config = json.loads(beside.read_text(encoding="utf-8"))
        state = _tensors(path, part, dtype)
    with parameters_on_meta():
        model = AutoencoderKL.from_config(config)
    return _assign(model, state, path, "AutoencoderKL").to(dtype).eval()


def _folder_class(folder: Path) -> tuple[str, str, int | None]:
    """(library, class, hidden width) of a model folder, from its config.json."""
    config = folder / "config.json"
    if not config.is_file():
        raise AdapterzooError(f"{folder}: not a model folder (no config.json)")
    data = json.loads(config.read_text(encoding="utf-8"))
    width = data.get("hidden_size") or data.get("d_model")
    if data.get("_class_name"):
        return "diffusers", data["_class_name"], width
    return "transformers", (data.get("architectures") or ["?"])[0], width


def _load_folder(library: str, cls: str, folder: Path, dtype: torch.dtype) -> Any:
    import importlib

    kwargs = {"torch_dtype" if library == "diffusers" else "dtype": dtype}
    try:
        return getattr(importlib.import_module(library), cls).from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise BadFileError(f"cannot load {folder}: {str(exc).splitlines()[0]}") from None


def _tokenizer_folder(folder: Path, slot: str) -> Path | None:
    for where in (folder, folder.parent / tokenizer_slot(slot), folder.parent / tokenizer_slot(folder.name)):
        if where.is_dir() and any((where / name).is_file() for name in TOKENIZER_FILES):
            return where
    return None


def _tokenizer_from(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadFileError(f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0]}") from None


def _given(path: Path) -> _Given:
    if path.is_dir():
        library, cls, width = _folder_class(path)
        return _Given(path, cls, width, library=library)
    part = recognise(open_checkpoint_file(path).shapes)
    if part is None:
        raise AdapterzooError(f"--text-encoders {path.name}: not a text encoder (no CLIP, T5 or Qwen3 tensors); "
                              "its list runs to the next option, so FILE... goes before it")
    if part.kind != "text encoder":
        raise AdapterzooError(f"--text-encoders {path.name}: it is {part.what()}; give it with --vae")
    return _Given(path, part.model_class, part.width, part)


def load_given(family: Family, text_encoders: list[Path], vae: Path | None, dtype: torch.dtype
               ) -> tuple[dict[str, Any], dict[str, Path]]:
    """(parts by slot, the single files among the text encoders by slot: their tokenizers are still to find)."""
    found: dict[str, Any] = {}
    files: dict[str, Path] = {}
    slots = encoder_slots(family)
    given = [_given(Path(path)) for path in text_encoders]
    for entry, slot in zip(given, _assign_slots(family, given), strict=True):
        if entry.part is None:
            found[slot] = _load_folder(entry.library, entry.model_class, entry.path, dtype)
            tokenizer = _tokenizer_folder(entry.path, slot)
            if tokenizer is not None:
                found[tokenizer_slot(slot)] = _tokenizer_from(tokenizer)
            else:
                files[slot] = entry.path
        else:
            found[slot] = _text_encoder_file(entry.path, entry.part, slots[slot], dtype)
            files[slot] = entry.path
    if vae is not None:
        vae = Path(vae)
        if vae.is_dir():
            found["vae"] = _load_folder(*family.sampling.parts.get("vae", ("diffusers", "AutoencoderKL")), vae, dtype)
        else:
            part = recognise(open_checkpoint_file(vae).shapes)
            if part is None or part.kind != "vae":
                raise AdapterzooError(f"--vae {vae.name}: not a VAE" + (f" (it is {part.what()})" if part else ""))
            found["vae"] = _vae_file(vae, part, family, dtype)
    return found, files


def vae_inside(family: Family, checkpoint: Path, dtype: torch.dtype) -> torch.nn.Module | None:
    """The VAE a single file holds beside its transformer in LDM names under `first_stage_model.` (SAI's SD3.5
    files), loaded as a --vae FILE would be; None when it holds none."""
    shapes = open_checkpoint_file(checkpoint).shapes
    inside = {key: shape for key, shape in shapes.items() if key.startswith(VAE_INSIDE)}
    part = recognise(inside) if inside else None
    if part is None or part.kind != "vae" or not part.ldm:
        return None
    return _vae_file(checkpoint, part, family, dtype)


def builtin_tokenizer(family: Family, slot: str, encoder: torch.nn.Module) -> Any | None:
    """The CLIP tokenizer that ships with adapterzoo, for a CLIP slot whose encoder has CLIP's whole vocabulary."""
    spec = family.sampling
    _, cls = (spec.parts | spec.optional).get(tokenizer_slot(slot), ("", ""))
    if not cls.startswith("CLIPTokenizer"):
        return None
    vocab, lines, _ = vocabulary()
    if encoder.get_input_embeddings().num_embeddings != len(vocab):
        return None
    from transformers import CLIPTokenizer

    openclip = encoder.config.hidden_act == "gelu"
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(line.split()) for line in lines],
                         model_max_length=MAX_LENGTH, **special_tokens("!" if openclip else "<|endoftext|>"))
