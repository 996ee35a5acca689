"""What a file's first bytes say it is, for the one-line error when it is not the format a reader expected."""

from __future__ import annotations

import struct

SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG signature: an image"),
    (b"\xff\xd8\xff", "a JPEG signature: an image"),
    (b"RIFF", "a RIFF signature (WebP image?)"),
    (b"GIF8", "a GIF signature: an image"),
    (b"PK\x03\x04", "a zip signature (a torch .ckpt/.pt?)"),
    (b"GGUF", "a GGUF signature"),
    (b"\x80", "a pickle opcode (a torch .ckpt/.pt?)"),
)


def describe_start(head: bytes) -> str:
    """'starts with a PNG signature: an image', "starts with '{\"': JSON text", ... for the first bytes `head`."""
    for magic, what in SIGNATURES:
        if head.startswith(magic):
            return f"starts with {what}"
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if length < 100_000_000 and head[8:9] == b"{":
            return "starts with a safetensors header"
    text = head[:16].decode("utf-8", errors="replace")
    shown = text[:2] if text[:1] in "{[" else text[:10]
    if text[:1] in "{[":
        return f"starts with {shown!r}: JSON text"
    if text.isprintable() or text.strip().isprintable():
        return f"starts with {shown!r}: text"
    return f"starts with bytes {head[:4].hex(' ')}"
