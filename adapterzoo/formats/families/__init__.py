"""Model families as plug-ins: each module or package directly under this one is a family, found by
`formats.model.registry` (which lists this package; nothing here imports a family). Adding a family is
adding one module (or package) and its tests; no dispatcher changes.

What a family module provides: a module-level `FAMILY = Family(...)` (`formats.model.family`). Required:

- `name` (the module's name), `title` (for messages: "Flux"), `bases` (the words probe answers, e.g.
  ("sd1", "sd2", "sdxl")), and `order` (detection order, lower first: a family whose key names overlap
  another's, such as BFL's over SD3's MMDiT, goes before it; widths-only recognisers go last).

Everything else is optional and defaults to "this family has none" (the dispatcher then refuses in one
line, or asks the next family):

- recognising files, plain Python on names and shapes (probe reads a header, never torch):
  `lora_base(modules, table)`, `lora_fits(modules, table)` (a base whose model a LoRA claimed by another
  family fits as well: metadata then decides between them), `metadata_base(metadata)`,
  `describe_lora(modules, table, result)` (coverage, variants, warnings), `dialects` (key spellings only this
  family's LoRAs use: name, `speaks(keys)`, `split(key)`), `probe_checkpoint(table, result)` (kind, base,
  format, details), `pipeline_base(class, config)` and `describe_folder(config, result)` (a diffusers folder),
  `vae_latents` {latent channels: base}, `embedding_base(slots)` {encoder slot or "": width},
  `hypernetwork_base(widths)`; `unconfirmed_members` (the `details` facts that name a member the weights cannot
  tell apart, read from a file name or metadata with where in `details["read_from"]`: merge refuses a LoRA and a
  checkpoint, or two LoRAs, that declare different ones);
- module tables and dialects: `architecture(base, variant)` (the real-size targets of a base, or of its
  member where members differ in size; from configs shipped in data/module_tables.json.gz, built on the meta
  device, or written out from the config in plain Python as `flux2` does) and `architecture_from_tables(base, tables)`
  (any size), each target with every spelling its trainers write as the `Architecture`'s aliases, and a
  fused projection's spellings as `Architecture.fused` (fused <-> split rows, read and split exactly);
  `lora_writers` {dialect: LoraFile -> tensors} for the dialects it names its own way (kohya in BFL
  space, bfl); `lora_refusal(modules)` (why a file is not an additive LoRA); `modelspec_architecture`;
- checkpoint layouts (`Checkpoints`): `file_base(table)`, `owns_folder` / `folder_base`,
  `to_single_file(folder, dtype)`, `to_folder(source, dtype, folder)`, `targets(path, source)` (where each
  LoRA target's weight lives, for merge and extract);
- sources and sampling: `civitai_base_models`, `civitai_details` (what a label implies beyond the base: an
  SDXL family, an SD3.5 size), `hub_hints`, `sampling` (`Sampling`: the bases verify
  renders; pipeline class, scheduler and guidance facts belong there as verify learns new families).

Keep the declaration module light: torch, diffusers and transformers only inside the functions that need
them (import submodules lazily, as `sd` and `flux` do), so listing the families costs milliseconds. A family
module may import from io/, model/, lora/, checkpoint/ what does not itself ask the registry (the parts,
shapes, fused-row math, weight locations), never a dispatcher: `tests/test_layout.py` counts the
registry's listing as imports and refuses any circle, and refuses any module outside this package that
names a family's base or imports a family.
"""
