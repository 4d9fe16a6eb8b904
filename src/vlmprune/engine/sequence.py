"""The token sequence the decoder works on, and the one place where tokens are physically dropped.

Each row is one sample. Tokens stay in their original order; every token carries its original
rotary position, its index among the sample's visual tokens (-1 for text) and its index in the
original prompt. After a drop the rows are right-aligned (padding slots on the left), so the batch
stays one dense tensor even when samples keep different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import PreparedInputs
from .plan import KeepRows


@dataclass
class TokenState:
    hidden: torch.Tensor  # [B, L, D]
    positions: torch.Tensor  # [A, B, L] original rotary positions
    valid: torch.Tensor  # [B, L] bool, False for padding slots
    visual_index: torch.Tensor  # [B, L] index among the sample's visual tokens, -1 for text and padding
    source_index: torch.Tensor  # [B, L] index in the original prompt, -1 for padding slots

    @classmethod
    def from_prepared(cls, prep: PreparedInputs) -> "TokenState":
        visual = prep.visual_mask & prep.attention_mask
        visual_index = (visual.long().cumsum(1) - 1).masked_fill(~visual, -1)
        source_index = torch.arange(visual.shape[1], device=visual.device).expand_as(visual)
        source_index = source_index.masked_fill(~prep.attention_mask, -1)
        return cls(prep.inputs_embeds, prep.position_ids, prep.attention_mask, visual_index, source_index)

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def token_counts(self) -> torch.Tensor:
        """[B] real tokens per sample."""
        return self.valid.sum(1)

    def visual_counts(self) -> torch.Tensor:
        """[B] visual tokens per sample."""
        return (self.visual_index >= 0).sum(1)

    def last_index(self) -> torch.Tensor:
        """[B] index of each sample's last real token."""
        t = torch.arange(self.valid.shape[1], device=self.valid.device)
        return torch.where(self.valid, t, -1).amax(1)

    def first_absent(self, keep: KeepRows) -> int | None:
        """The first sample whose row in `keep` names a visual token no longer present, else None
        (a few reads from the device, however large the batch)."""
        device = self.visual_index.device
        n_cols = int(self.visual_index.max()) + 1
        sample, index = _flat_rows(keep, device)
        present = torch.zeros(self.batch_size, max(n_cols, 1), dtype=torch.bool, device=device)
        b_idx, t_idx = (self.visual_index >= 0).nonzero(as_tuple=True)
        present[b_idx, self.visual_index[b_idx, t_idx]] = True
        absent = (index >= n_cols) | ~present[sample, index.clamp(max=max(n_cols - 1, 0))]
        bad = sample[absent]
        return int(bad.min()) if bad.numel() else None

    def keep_visual(self, keep: KeepRows, merge: KeepRows | None = None) -> "TokenState":
        """A new state with only the kept visual tokens (and every text token) of each sample.

        With `merge` (per sample, each visual token's target kept token or -1), a kept token's hidden
        state becomes the mean over the tokens assigned to it, itself included.
        """
        bsz, length = self.valid.shape
        device = self.valid.device
        hidden_src = self.hidden if merge is None else self._merged_hidden(merge)
        n_cols = max(int(self.visual_index.max()) + 1, 1)
        sample, index = _flat_rows(keep, device)
        table = torch.zeros(bsz, n_cols, dtype=torch.bool, device=device)
        table[sample, index] = True
        is_visual = self.visual_index >= 0
        kept = self.valid & (~is_visual | table.gather(1, self.visual_index.clamp(min=0)))
        counts = kept.sum(1)
        new_len = int(counts.max())
        # destination column of each kept token: right-aligned, original order preserved
        dest = (new_len - counts)[:, None] + kept.long().cumsum(1) - 1
        b_idx, t_idx = kept.nonzero(as_tuple=True)
        src = torch.zeros(bsz, new_len, dtype=torch.long, device=device)
        src[b_idx, dest[b_idx, t_idx]] = t_idx
        valid = torch.zeros(bsz, new_len, dtype=torch.bool, device=device)
        valid[b_idx, dest[b_idx, t_idx]] = True
        hidden = hidden_src.gather(1, src[..., None].expand(-1, -1, self.hidden.shape[-1]))
        positions = self.positions.gather(2, src[None].expand(self.positions.shape[0], -1, -1))
        visual_index = self.visual_index.gather(1, src).masked_fill(~valid, -1)
        source_index = self.source_index.gather(1, src).masked_fill(~valid, -1)
        return TokenState(hidden, positions, valid, visual_index, source_index)

    def _merged_hidden(self, merge: KeepRows) -> torch.Tensor:
        """Hidden states where each merge target holds the mean of the tokens assigned to it."""
        bsz, length, dim = self.hidden.shape
        device = self.hidden.device
        n_cols = int(self.visual_index.max()) + 1
        if n_cols == 0:
            return self.hidden
        # per sample: visual index -> its merge target (a visual index, -1 = none) and -> its sequence position
        target = torch.full((bsz, n_cols), -1, dtype=torch.long, device=device)
        for b, row in enumerate(merge):
            m = min(row.numel(), n_cols)
            target[b, :m] = row[:m].to(device)
        position = torch.full((bsz, n_cols), -1, dtype=torch.long, device=device)
        b_idx, t_idx = (self.visual_index >= 0).nonzero(as_tuple=True)
        position[b_idx, self.visual_index[b_idx, t_idx]] = t_idx
        goes_to = target[b_idx, self.visual_index[b_idx, t_idx]]  # target of every present visual token
        use = goes_to >= 0
        dest = b_idx[use] * length + position[b_idx[use], goes_to[use]]  # flattened (sample, position)
        sums = torch.zeros(bsz * length, dim, dtype=torch.float32, device=device)
        sums.index_add_(0, dest, self.hidden[b_idx[use], t_idx[use]].float())
        counts = torch.zeros(bsz * length, dtype=torch.float32, device=device)
        counts.index_add_(0, dest, torch.ones(dest.numel(), device=device))
        merged = self.hidden.reshape(-1, dim).clone()
        has = counts > 0
        merged[has] = (sums[has] / counts[has, None]).to(merged.dtype)
        return merged.view(bsz, length, dim)


def _flat_rows(rows: KeepRows, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, index) of every entry of per-sample index rows, flattened, on `device`."""
    lengths = torch.tensor([row.numel() for row in rows], dtype=torch.long)
    sample = torch.repeat_interleave(torch.arange(len(rows)), lengths).to(device)
    index = torch.cat([row.reshape(-1).to(device=device, dtype=torch.long) for row in rows]) if rows else sample
    return sample, index


def prefill_mask(
    valid: torch.Tensor, attn_implementation: str, dtype: torch.dtype, padded: bool | None = None
) -> torch.Tensor | None:
    """The causal + padding mask ``[B, 1, L, L]`` for a prefill, in the form the attention backend takes.

    With no padding under sdpa it is None (sdpa then runs its own causal kernel, as transformers does).
    Padding query rows attend to themselves only, so no row is fully masked (no NaN). `padded`: whether
    `valid` has a False entry, if the caller knows (else it is read from `valid`).
    """
    if padded is None:
        padded = not bool(valid.all())
    if attn_implementation == "sdpa" and not padded:
        return None
    length = valid.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    allowed = (eye.logical_not().tril() & valid[:, None, :]) | eye  # (B, L, L)
    return _for_backend(allowed[:, None], attn_implementation, dtype)


def decode_mask(
    key_valid: torch.Tensor, attn_implementation: str, dtype: torch.dtype, padded: bool | None = None
) -> torch.Tensor | None:
    """The mask ``[B, 1, 1, T]`` for one new token against a layer's cache (None when nothing is padding).

    `padded`: whether some key is padding, if the caller knows (the engine records it at prefill, so a
    decode step reads nothing back from the device); else it is read from `key_valid`."""
    if padded is None:
        padded = not bool(key_valid.all())
    if not padded:
        return None
    return _for_backend(key_valid[:, None, None, :], attn_implementation, dtype)


def _for_backend(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    if attn_implementation == "sdpa":
        return allowed
    # eager adds the mask to the scores
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
