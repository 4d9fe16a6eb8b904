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
    """``keys[i]`` / ``values[i]`` / ``key_valid[i]``: what layer i holds now (None: it did not run).

    `reserve(n)` (generation calls it once after prefill, with the tokens still to come) gives every
    layer room for `n` more tokens: later `update`s and `append_valid`s write in place and the three
    become views of the first ``length`` slots of preallocated buffers, so a decode step copies
    nothing that is already cached (before, each step re-concatenated every layer's keys, values and
    validity: quadratic copying over a long generation). Without room (no reserve, or more tokens
    than reserved), `update` concatenates, as transformers' dynamic cache does."""

    def __init__(self, n_layers: int, batch_size: int):
        self.batch_size = batch_size
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # [B_l, Hkv, T_l, d]
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.key_valid: list[torch.Tensor | None] = [None] * n_layers  # [B_l, T_l] bool
        self.rows: list[torch.Tensor | None] = [None] * n_layers  # samples that run the layer; None = all
        self.padded: list[bool] = [False] * n_layers  # whether some key is padding (decode then needs a mask)
        self._room: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n_layers  # buffers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's keys/values for one layer; return everything the layer has seen."""
        held = self.keys[layer_idx]
        if held is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        room, start, stop = self._room[layer_idx], held.shape[-2], held.shape[-2] + key.shape[-2]
        if room is not None and stop <= room[0].shape[-2]:
            room[0][..., start:stop, :] = key
            room[1][..., start:stop, :] = value
            self.keys[layer_idx], self.values[layer_idx] = room[0][..., :stop, :], room[1][..., :stop, :]
        else:
            self.keys[layer_idx] = torch.cat([held, key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` more entries in every layer that ran (buffers on each layer's device)."""
        if tokens < 1:
            return
        for i, (k, v, valid) in enumerate(zip(self.keys, self.values, self.key_valid)):
            if k is None or valid is None:
                continue
            length = k.shape[-2]
            kb = k.new_empty(*k.shape[:-2], length + tokens, k.shape[-1])
            vb = v.new_empty(*v.shape[:-2], length + tokens, v.shape[-1])
            mb = valid.new_ones(valid.shape[0], length + tokens)  # a new token is always a real key
            kb[..., :length, :], vb[..., :length, :], mb[:, :length] = k, v, valid
            self._room[i] = (kb, vb, mb)
            self.keys[i], self.values[i], self.key_valid[i] = kb[..., :length, :], vb[..., :length, :], mb[:, :length]

    def append_valid(self, layer_idx: int) -> torch.Tensor:
        """One more real key in the layer (a decode step's token); the layer's validity ``[B_l, T + 1]``."""
        valid = self.key_valid[layer_idx]
        room, stop = self._room[layer_idx], valid.shape[1] + 1
        if room is not None and stop <= room[2].shape[1]:
            self.key_valid[layer_idx] = room[2][:, :stop]  # the buffer was filled with True
        else:
            self.key_valid[layer_idx] = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
        return self.key_valid[layer_idx]

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
        """Bytes of the cached keys and values (padding slots included; room reserved for tokens not
        yet generated is not counted: `reserved_bytes`)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def reserved_bytes(self) -> int:
        """Bytes of the preallocated key and value buffers (`reserve`), filled or not."""
        return sum(b.numel() * b.element_size() for room in self._room if room is not None for b in room[:2])
