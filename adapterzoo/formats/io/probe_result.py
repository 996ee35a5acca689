"""What `probe` answers about one file or folder, in the vocabulary of DESIGN.md (bases: the model families')."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("checkpoint", "lora", "lycoris", "hypernetwork", "embedding", "vae", "controlnet", "unknown")


def with_article(word: str) -> str:
    """`a lora`, `an embedding`, `an unknown` (every kind and base begins as it is spelled)."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


@dataclass
class ProbeResult:
    """One file's identity. `details` holds kind-specific facts (variant, algo, vectors, ...)."""

    path: str
    kind: str = "unknown"
    base: str = "unknown"
    format: str | None = None
    rank: int | None = None
    alpha: float | None = None
    dtype: str | None = None
    tensors: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    data_offset: int | None = None  # safetensors only: where tensor data starts (AutoV3 hashes from here)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
