"""A prompt read by a chat model used as a text encoder (Qwen3 for Z-Image and Flux.2 Klein): one user turn in
the tokenizer's chat template with the assistant's turn opened, padded to a fixed length, every hidden state
kept; each family picks the layers its pipeline reads."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def chat_hidden_states(tokenizer: Any, encoder: torch.nn.Module, prompt: str, length: int, thinking: bool
                       ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(every hidden state [1, length, width], the bool mask of the prompt's tokens), as ZImagePipeline and
    Flux2KleinPipeline compute them (`enable_thinking` is where the two differ)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    tokens = tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device).bool()
    out = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True,
                  use_cache=False)
    return out.hidden_states, mask
