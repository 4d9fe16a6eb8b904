"""A KV cache with one independent entry per decoder layer.

Each layer holds only the tokens it saw: all of them before a token stage, the kept ones after,
nothing for a skipped layer. The unmodified attention modules call `update`, as they do with
transformers' caches; the engine keeps, beside each layer's keys, which entries are real tokens
and which samples of the batch run that layer. Everything a layer's entry holds lives on that
layer's device (where its attention computes), also when the model is split over devices.
"""

from __future__ import annotations

import torch


class LayerwiseKVCache:
    def __init__(self, n_layers: int, batch_size: int):
        self.batch_size = batch_size
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # [B_l, Hkv, T_l, d]
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.key_valid: list[torch.Tensor | None] = [None] * n_layers  # [B_l, T_l] bool
        self.rows: list[torch.Tensor | None] = [None] * n_layers  # samples that run the layer; None = all
        self.padded: list[bool] = [False] * n_layers  # whether some key is padding (decode then needs a mask)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's keys/values for one layer; return everything the layer has seen."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def runs(self, layer_idx: int) -> bool:
        return self.key_valid[layer_idx] is not None

    def entries(self) -> torch.Tensor:
        """[B, n_layers] real (non-padding) cached tokens per sample and layer; 0 where a layer did not run.

        Counted where each layer's cache lives and read back to the CPU in one transfer."""
        present = [v for v in self.key_valid if v is not None]
        device = present[0].device if present else torch.device("cpu")
        out = torch.zeros(self.batch_size, len(self.keys), dtype=torch.long, device=device)
        for layer, valid in enumerate(self.key_valid):
            if valid is None:
                continue
            rows = self.rows[layer]
            counts = valid.sum(1).to(device)
            if rows is None:
                out[:, layer] = counts
            else:
                out[rows.to(device), layer] = counts
        return out.cpu()

    def nbytes(self) -> int:
        """Bytes held by keys and values (padding slots included)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
