"""The frozen text encoders' embeddings of the run's prompts, computed once (``--model.cache_text_embeddings``).

Frozen text encoders (not trained, in eval mode) map the instance prompt and the class prompt to the
same embeddings at every step, so they are computed once at the start of fit and each step looks its
rows up. SD has one encoder; SDXL two, whose conditioning (both penultimate states and the pooled
embedding, ``core.conditioning``) is cached whole and keyed on both tokenizers' ids. Trained text
encoders (``train_text_encoder``, also as LoRA adapters) run at every step as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdm_lightning.core.conditioning import PromptEmbeddings, encode_prompts

# One prompt's token ids: one [77] tensor per tokenizer (SD: one, SDXL: two).
PromptIds = tuple[torch.Tensor, ...]


class PromptCache:
    """Embeddings of a few prompts' token ids; ``lookup`` gives a batch's rows, None when one is not among them."""

    def __init__(self, input_ids: PromptIds, embeddings: PromptEmbeddings) -> None:
        self.input_ids = input_ids  # one [K, 77] per tokenizer
        self.embeddings = embeddings  # [K, 77, d] (and SDXL's pooled [K, d'])
        self._keys = torch.cat(input_ids, dim=-1)  # [K, 77 * tokenizers]: a row matches on every tokenizer's ids

    @classmethod
    def encode(cls, text_encoders: Sequence[torch.nn.Module], prompts: Sequence[PromptIds]) -> PromptCache:
        """The embeddings of the distinct ``prompts`` (each one [77] tensor per tokenizer), in one call, in their order."""
        distinct: list[PromptIds] = []
        for ids in prompts:
            if not any(all(torch.equal(a, b) for a, b in zip(ids, seen)) for seen in distinct):
                distinct.append(tuple(ids))
        device = next(text_encoders[0].parameters()).device
        input_ids = tuple(torch.stack([ids[i] for ids in distinct]).to(device) for i in range(len(distinct[0])))
        with torch.no_grad():
            embeddings = encode_prompts(text_encoders, input_ids)
        return cls(input_ids, embeddings)

    def lookup(self, input_ids: PromptIds) -> PromptEmbeddings | None:
        """The embeddings of each row of ``input_ids`` ([N, 77] per tokenizer), or None if a row is not a cached prompt."""
        if len(input_ids) != len(self.input_ids) or input_ids[0].device != self._keys.device:
            return None
        keys = torch.cat(input_ids, dim=-1)
        matches = (keys[:, None, :] == self._keys[None]).all(-1)  # [N, K]
        if not bool(matches.any(-1).all()):
            return None
        return self.embeddings[matches.int().argmax(-1)]
