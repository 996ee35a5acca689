"""Recognise Wan 2.1 / 2.2 files from names and shapes, plain Python on a header.

Wan's own names (`blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`) and diffusers' top-level `blocks.N.attn1` /
`attn2` / `ffn.net` are no other family's. The size is the width (1536: 2.1's 1.3B, 3072: 2.2's TI2V 5B, 5120: the
14B models); the task is the patch embedding's input channels (16 text-only, 36 latents + mask + image, 48 the
5B's) and 2.1's image encoder (`img_emb`, `k_img`; FLF2V's `emb_pos`); the version follows where the weights
decide it (2.1 alone has the 1.3B and the image encoder, 2.2 alone the 5B and a 36-channel model without one).
Where they do not (a 14B T2V), and for 2.2's high-noise and low-noise experts (the same tensors), the file name
or metadata is read as a hint, with a warning that the weights cannot confirm it; the expert is the family's
`unconfirmed_members`, so merge refuses a LoRA for one expert with a checkpoint (or LoRA) of the other.
"""

from __future__ import annotations

import re
from pathlib import Path

from adapterzoo.formats.families.wan.modules import BASE, SIZES, diffusers_name
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.lora_parts import module_dims
from adapterzoo.formats.model.block_names import bare, block_numbers, prefix_of

PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
WAN_MARKER = "blocks.0.cross_attn.q.weight"  # bare key of every transformer in Wan's own names
DIFFUSERS_MARKER = "blocks.0.attn2.to_q.weight"
TASKS = {16: "t2v", 36: "i2v", 48: "ti2v"}  # patch embedding's input channels -> task
_WAN = r"blocks[._]\d+[._](?:(?:self|cross)_attn[._](?:[qkvo]|[kv]_img)|ffn[._][02])(?=\.|$)"  # not Cosmos's q_proj
_DIFFUSERS = r"blocks[._]\d+[._](?:attn[12][._](?:to_[qkv]|to_out|add_[kv]_proj)|ffn[._]net[._])"
OWN = re.compile(rf"^(?:{_WAN}|{_DIFFUSERS}|img_emb[._]proj|condition_embedder[._]image_embedder)")
_IMAGE = re.compile(r"[kv]_img|add_[kv]_proj|img_emb|image_embedder")
_EXPERT = re.compile(r"(high|low)[-_ ]?noise", re.IGNORECASE)
PIPELINE_EXPERTS = {"transformer": "high-noise", "transformer_2": "low-noise"}  # a 2.2 A14B pipeline's folders
_VERSION = re.compile(r"wan[-_ ]?(?:video[-_ ]?)?2[._ ]?([12])(?!\d)", re.IGNORECASE)
SAME_EXPERTS = "Wan 2.2's high-noise and low-noise experts have the same tensor names and shapes"
SAME_14B = "Wan 2.1's T2V 14B and 2.2's T2V A14B have the same tensor names and shapes"
_INPUT_WIDE = re.compile(r"(?:(?:self|cross)_attn[._][qkvo]|ffn[._]0)(?:\.|$)|attn[12][._]to_(?:[qkv](?:\.|$)|out)"
                         r"|ffn[._]net[._]0[._]proj")
_OUTPUT_WIDE = re.compile(r"ffn[._](?:net[._])?2$")


def _width(modules: dict[str, dict[str, str]], table: TensorTable) -> int | None:
    """The transformer's width from any block Linear of a LoRA (the input of attention and ffn.0, ffn.2's output)."""
    for name, parts in modules.items():
        dims = module_dims(parts, table)
        if dims is not None and _INPUT_WIDE.search(name):
            return dims[1]
        if dims is not None and _OUTPUT_WIDE.search(name):
            return dims[0]
    return None


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """Wan's own module names, or diffusers' top-level `blocks.N.attn1` / `attn2` / `ffn.net`."""
    return BASE if any(OWN.search(bare(n)) for n in modules) else None


def metadata_base(metadata: dict[str, str]) -> str | None:
    """musubi-tuner's `ss_base_model_version` or a ModelSpec id naming Wan."""
    said = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    return BASE if re.search(r"(?<![a-z])wan(?![a-z])", said, re.IGNORECASE) else None


def _hints(result: ProbeResult, texts: dict[str, str], facts: dict) -> dict[str, str]:
    """The version and expert a file name or metadata says, where the weights leave them open, each with a
    warning; returns where each was read (merge names it when a LoRA's expert is not its checkpoint's)."""
    read_from: dict[str, str] = {}
    for where, text in texts.items():
        if "expert" not in facts and (m := _EXPERT.search(text)) and facts.get("version") in (None, "2.2"):
            read_from |= {"expert": where} | ({} if "version" in facts else {"version": where})
            facts |= {"expert": f"{m[1].lower()}-noise", "version": "2.2"}
            result.warnings.append(f"{SAME_EXPERTS}: read as {facts['expert']} from its {where}, which the weights "
                                   "cannot confirm")
        if "version" not in facts and (m := _VERSION.search(text)):
            facts["version"] = f"2.{m[1]}"
            read_from["version"] = where
            same = SAME_14B if facts.get("size") == "14b" else "Wan 2.1 and 2.2 share these tensor names"
            result.warnings.append(f"{same}: read as {facts['version']} from its {where}, which the weights cannot "
                                   "confirm")
    return read_from


def _describe(result: ProbeResult, facts: dict, texts: dict[str, str]) -> None:
    """`details`: size, task, version, expert, and `variant` joining those known (`2.2-i2v-14b-high-noise`)."""
    read_from = _hints(result, texts, facts)
    words = [facts.get(k) for k in ("version", "task", "size", "expert")]
    result.details |= {k: v for k, v in facts.items() if v is not None}
    if any(words):
        result.details["variant"] = "-".join(w for w in words if w)
    if read_from:
        result.details["read_from"] = read_from


def coverage(names: list[str]) -> dict:
    """Which blocks a Wan LoRA patches, and which parts of them (either naming)."""
    paths = [bare(n) for n in names]
    return {"blocks": block_numbers(names, "blocks"),
            "self_attention": any(re.search(r"attn1|self_attn", p) for p in paths),
            "cross_attention": any(re.search(r"attn2|cross_attn", p) for p in paths),
            "ffn": any(re.search(r"ffn", p) for p in paths),
            "image_conditioning": any(_IMAGE.search(p) for p in paths), "text_encoders": [],
            "other_modules": sum(1 for n in names if not re.match(r"blocks[._]\d", bare(n)))}


def lora_facts(modules: dict[str, dict[str, str]], table: TensorTable) -> dict:
    """size from the width; i2v from 2.1's image attention, else the task a patch-embedding module's input says."""
    width = _width(modules, table)
    image = any(_IMAGE.search(bare(n)) for n in modules)
    size = SIZES.get(width) if width is not None else None
    patch = next((dims for name, parts in modules.items()
                  if bare(name) == "patch_embedding" and (dims := module_dims(parts, table))), None)
    task = "i2v" if image else TASKS.get(patch[1]) if patch is not None else None
    facts: dict = {"size": size, "task": task}
    if image or size == "1.3b":
        facts["version"] = "2.1"  # 2.2 has no image encoder and no 1.3B
    elif size == "5b":
        facts["version"] = "2.2"
    return {k: v for k, v in facts.items() if v is not None}


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    """Coverage and facts; metadata, then the file name, for what the weights leave open (musubi's and lightx2v's
    2.2 LoRAs come as a `..._high_noise` / `..._low_noise` pair of files)."""
    result.details["coverage"] = coverage(list(modules))
    texts = {f"metadata ({key})": value for key, value in result.metadata.items()}
    _describe(result, lora_facts(modules, table), {**texts, "file name": Path(result.path).name})


def checkpoint_prefix(keys: dict | list) -> str | None:
    """The prefix of a Wan transformer's keys in either naming: none, `model.diffusion_model.`, `diffusion_model.`."""
    prefix = prefix_of(keys, WAN_MARKER, PREFIXES)
    if prefix is not None and f"{prefix}patch_embedding.weight" in keys:
        return prefix
    prefix = prefix_of(keys, DIFFUSERS_MARKER, PREFIXES)
    if prefix is not None and f"{prefix}condition_embedder.time_proj.weight" in keys:
        return prefix
    return None


def facts_of(width: int, in_channels: int, image: bool, pos_embed: bool) -> dict:
    """size, task and (where the weights decide it) version of a transformer."""
    task = TASKS.get(in_channels)
    if task == "i2v" and pos_embed:
        task = "flf2v"
    size = SIZES.get(width)
    facts = {"size": size, "task": task}
    if image or size == "1.3b":
        facts["version"] = "2.1"
    elif in_channels in (36, 48):
        facts["version"] = "2.2"  # the 5B, and an I2V without 2.1's image encoder (2.2's A14B)
    return {k: v for k, v in facts.items() if v is not None}


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """Wan-AI's original and ComfyUI's single files (bare or under `model.diffusion_model.`), diffusers-named
    files, GGUFs of either (probe passes their names and shapes)."""
    prefix = checkpoint_prefix(table)
    if prefix is None:
        return False
    names = [diffusers_name(k[len(prefix):]) for k in table if k.startswith(prefix)]
    embed = table[f"{prefix}patch_embedding.weight"].shape
    result.kind, result.base = "checkpoint", BASE
    result.format = "ldm" if prefix + WAN_MARKER in table else "diffusers"
    result.details |= {"width": embed[0], "in_channels": embed[1], "blocks": len(block_numbers(names, "blocks")),
                       "components": ["transformer"]}
    image = any(n.startswith("condition_embedder.image_embedder.") for n in names)
    pos = "condition_embedder.image_embedder.pos_embed" in names
    texts = {f"metadata ({key})": value for key, value in result.metadata.items()}
    texts = {**_place(Path(result.path)), **texts, "file name": Path(result.path).name}
    _describe(result, facts_of(embed[0], embed[1], image, pos), texts)
    return True


def _place(folder: Path) -> dict[str, str]:
    """The expert a transformer folder of a 2.2 A14B pipeline folder (one with `transformer_2`) is run as, as a
    hint: diffusers' WanPipeline denoises high noise with `transformer` and low noise with `transformer_2`."""
    pipeline = folder.parent
    if folder.name not in PIPELINE_EXPERTS or not (pipeline / "model_index.json").is_file():
        return {}
    if not (pipeline / "transformer_2" / "config.json").is_file():
        return {}
    return {f"place in {pipeline.name} ({folder.name})": PIPELINE_EXPERTS[folder.name]}


def describe_folder(config: dict, result: ProbeResult) -> None:
    """A diffusers folder's size and task from its transformer's config; version and expert where its saved-from
    path (`_name_or_path`) says."""
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    facts = facts_of(width, config.get("in_channels", 0), config.get("image_dim") is not None,
                     config.get("pos_embed_seq_len") is not None)
    if "transformer_2" in result.details.get("components", ()):  # 2.2 A14B: transformer high-noise, _2 low-noise
        facts |= {"version": "2.2", "experts": ["high-noise", "low-noise"]}
    _describe(result, facts, {"config (_name_or_path)": str(config.get("_name_or_path", ""))})
