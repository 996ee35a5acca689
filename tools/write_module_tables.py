"""Write adapterzoo/data/module_tables.json.gz: the module tables `formats.model.module_tables` ships.

One table per (model class, config) that the built-in SD1/SD2/SDXL/SD3/SD3.5/Flux.1 bases and standard single files
(those bases, plus the 9-channel inpainting UNets) ask for, built on the `meta` device by the installed
diffusers and transformers. The single files are the test factory's sparse ones: every real key and
shape, no data. Run it after changing a built-in config or the config inference, then run the tests:

    python tools/write_module_tables.py
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import factory  # noqa: E402 - the tests folder is put on the path first

from adapterzoo.formats.families.flux.modules import (  # noqa: E402
    CLIP_L_CONFIG,
    FLUX_CLASS,
    FLUX_DEV_CONFIG,
    T5_XXL_CONFIG,
)
from adapterzoo.formats.families.sd.modules import TEXT_ENCODER_CONFIGS, UNET_CONFIGS  # noqa: E402
from adapterzoo.formats.families.sd.targets import single_file_parts  # noqa: E402
from adapterzoo.formats.families.sd3.modules import CONFIGS as MMDIT_CONFIGS  # noqa: E402
from adapterzoo.formats.families.sd3.modules import MMDIT_CLASS  # noqa: E402
from adapterzoo.formats.io.tensor_source import open_checkpoint_file  # noqa: E402
from adapterzoo.formats.model.module_tables import (  # noqa: E402
    CLIP_CLASS,
    CLIP_PROJECTION_CLASS,
    SHIPPED,
    T5_CLASS,
    UNET_CLASS,
    build_on_meta,
    table_key,
    table_of,
)

STANDARD_FILES = [("sd1", 4), ("sd2", 4), ("sdxl", 4), ("sd1", 9), ("sdxl", 9)]  # (base, UNet input channels)


def wanted() -> dict[str, tuple[str, dict]]:
    """table key -> (model class, config), for every table the built-in bases and standard files ask for."""
    found = {table_key(UNET_CLASS, config): (UNET_CLASS, config) for config in UNET_CONFIGS.values()}
    for encoders in TEXT_ENCODER_CONFIGS.values():
        for config, projection in encoders.values():
            model_class = CLIP_PROJECTION_CLASS if projection else CLIP_CLASS
            found[table_key(model_class, config)] = (model_class, config)
    for guidance in (True, False):  # Flux.1 dev and schnell, with their CLIP-L and T5-XXL
        config = {**FLUX_DEV_CONFIG, "guidance_embeds": guidance}
        found[table_key(FLUX_CLASS, config)] = (FLUX_CLASS, config)
    found[table_key(CLIP_CLASS, CLIP_L_CONFIG)] = (CLIP_CLASS, CLIP_L_CONFIG)
    for config in MMDIT_CONFIGS.values():  # SD3 Medium, SD3.5 Large and Medium (their text encoders are above)
        found[table_key(MMDIT_CLASS, config)] = (MMDIT_CLASS, config)
    found[table_key(T5_CLASS, T5_XXL_CONFIG)] = (T5_CLASS, T5_XXL_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        for base, channels in STANDARD_FILES:
            path = factory.write_sparse_safetensors(Path(tmp) / f"{base}-{channels}.safetensors",
                                                    factory.sd_checkpoint_specs(base, in_channels=channels))
            for part in single_file_parts(open_checkpoint_file(path), base).values():
                found[table_key(part.model_class, part.config)] = (part.model_class, part.config)
    return found


def main() -> None:
    tables = {}
    for key, (model_class, config) in sorted(wanted().items()):
        table = table_of(build_on_meta(model_class, config))
        tables[key] = json.dumps({"modules": table.modules, "config": table.config}, separators=(",", ":"))
    out = ROOT / "adapterzoo" / "data" / SHIPPED
    out.write_bytes(gzip.compress(json.dumps(tables, indent=0).encode(), mtime=0))
    print(f"wrote {len(tables)} tables to {out.relative_to(ROOT)} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
