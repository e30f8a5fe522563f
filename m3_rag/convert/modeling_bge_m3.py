"""BGE-M3 as one transformers model: ``AutoModel`` returns the dense, lexical and ColBERT
outputs (written into a checkpoint by ``m3-rag convert``; load it with
``AutoModel.from_pretrained(path, trust_remote_code=True)``).

The backbone is the checkpoint's own ``XLMRobertaModel`` (its tensors keep their names, so a
plain ``AutoModel.from_pretrained(path)`` still loads the backbone alone); the two heads are
``colbert_linear`` (``Linear(hidden, colbert_dim)``) and ``sparse_linear`` (``Linear(hidden,
1)``), as in FlagEmbedding's ``BGEM3FlagModel``. ``forward`` returns per-token outputs:

* ``dense_output`` ``[B, H]``: the L2-normalised CLS state;
* ``sparse_output`` ``[B, T]``: ``relu(sparse_linear(h))`` per token, 0 on padding (the
  lexical weights of a text: the max per token id over its tokens, special tokens dropped);
* ``colbert_output`` ``[B, T-1, D]``: ``colbert_linear(h[:, 1:])`` masked and L2-normalised
  per vector (the first ``n_tokens - 1`` rows of a text are its ColBERT vectors);
* ``last_hidden_state`` ``[B, T, H]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import XLMRobertaModel
from transformers.modeling_outputs import ModelOutput


@dataclass
class BGEM3Output(ModelOutput):
    """The three BGE-M3 outputs (per token) and the backbone's last hidden state."""

    last_hidden_state: torch.Tensor | None = None
    dense_output: torch.Tensor | None = None
    sparse_output: torch.Tensor | None = None
    colbert_output: torch.Tensor | None = None


class BGEM3Model(XLMRobertaModel):
    """XLM-RoBERTa with BGE-M3's ColBERT and lexical heads."""

    def __init__(self, config: Any, add_pooling_layer: bool | None = None) -> None:
        if add_pooling_layer is None:
            add_pooling_layer = bool(getattr(config, "m3_pooler", False))
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        colbert_dim = int(getattr(config, "colbert_dim", None) or config.hidden_size)
        self.colbert_linear = nn.Linear(config.hidden_size, colbert_dim)
        self.sparse_linear = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BGEM3Output:
        kwargs.pop("return_dict", None)
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden = outputs[0]
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = attention_mask.to(hidden.dtype)
        dense = F.normalize(hidden[:, 0], dim=-1)
        sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1) * mask
        colbert = self.colbert_linear(hidden[:, 1:]) * mask[:, 1:, None]
        colbert = F.normalize(colbert, dim=-1)
        return BGEM3Output(
            last_hidden_state=hidden,
            dense_output=dense,
            sparse_output=sparse,
            colbert_output=colbert,
        )
