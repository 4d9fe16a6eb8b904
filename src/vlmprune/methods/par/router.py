"""PAR's meta-router: reads the hidden states entering its token layer K and learnable layer tokens,
scores every visual token and every decoder layer (Pruning All-Rounder, arXiv:2412.06458).

The router sees, per sample, the input hidden states of decoder layer K (`RouterConfig.token_layer`;
at K = 0 the prompt's input embeddings, `PreparedInputs.inputs_embeds`), projected down to `width`,
plus sinusoidal features of each token's original positions (every RoPE axis) and, for visual tokens
laid out as one grid, of its row and column. One learnable token per decoder layer and one budget
token (an embedding of the requested token and layer shares) join the sequence; `depth`
bidirectional transformer layers let image tokens see the question. A visual token's logit is a
linear head plus, with `question_head`, the scaled dot product of a query from the last real token
(which ends the question) and a key from the token; each layer's logit comes from its layer token.

Kept visual tokens are chosen by *tile-balanced* top-k (`methods.tiles.balanced_scores`, the default
``RouterConfig.balanced``): the router decides which token of each tile survives, and where its
logits differ most; plain top-k of per-token scores keeps contiguous regions and loses whole objects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...errors import VlmpruneError
from ...validate import check_integer
from ...models.base import PreparedInputs
from ..tiles import balanced_scores


@dataclass(frozen=True)
class RouterConfig:
    """The router's shape and the LVLM it was built for (`lm_hidden`, `n_layers`, `model_type`,
    `position_axes`); `token_layer`: the decoder layer K whose input the router reads and from which
    dropped visual tokens are gone (layers before K always run); `question_head`: add the
    last-token query x token key score to each visual token's logit."""

    model_type: str
    lm_hidden: int
    n_layers: int
    position_axes: int = 1
    width: int = 64
    heads: int = 4
    depth: int = 1
    ffn: int = 128
    position_features: int = 16
    token_layer: int = 0
    balanced: bool = True
    question_head: bool = True

    def __post_init__(self) -> None:
        for name in ("lm_hidden", "n_layers", "position_axes", "width", "heads", "depth", "ffn", "position_features"):
            value = getattr(self, name)
            check_integer(value, f"RouterConfig.{name}={value!r} must be a positive int", 1)
        if self.width % self.heads:
            raise VlmpruneError(f"RouterConfig.width={self.width} must be divisible by heads={self.heads}")
        check_integer(self.token_layer, f"RouterConfig.token_layer={self.token_layer!r} must be a decoder layer in 0..{self.n_layers - 1}",
                      0, self.n_layers - 1)

    @classmethod
    def for_model(cls, pm, **overrides) -> "RouterConfig":
        """A router config sized for `pm` (a `PrunedModel`)."""
        text = pm.adapter.text_config
        return cls(str(pm.config.model_type), int(text.hidden_size), pm.n_layers, pm.adapter.position_axes, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_model(self, pm) -> None:
        """Refuse a router built for another model (family, width or depth)."""
        mine = (self.model_type, self.lm_hidden, self.n_layers)
        theirs = (str(pm.config.model_type), int(pm.adapter.text_config.hidden_size), pm.n_layers)
        if mine != theirs:
            raise VlmpruneError(
                f"this router was trained for a {mine[0]} model with hidden size {mine[1]} and {mine[2]} decoder layers, "
                f"but the model is {theirs[0]} with hidden size {theirs[1]} and {theirs[2]} layers; train a router for it "
                "(vlmprune router train --model ...)"
            )


@dataclass
class RouterOutput:
    """``token_logits [B, V]`` per visual token in sequence order (-inf past a sample's count) and
    ``layer_logits [B, n_layers]``; `grids`: each sample's (rows, cols) visual layout or None;
    `balanced`: whether kept tokens are chosen tile-balanced (`selection_scores`)."""

    token_logits: torch.Tensor
    layer_logits: torch.Tensor
    n_visual: list[int]
    grids: list | None = None
    balanced: bool = True

    def selection_scores(self, keep: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, V]`` scores whose top-``keep[b]`` is sample b's selection (`logits`: e.g. perturbed
        token logits in place of the router's own)."""
        logits = self.token_logits if logits is None else logits
        return balanced_scores(logits, self.n_visual, self.grids, keep) if self.balanced else logits


def sinusoid(values: torch.Tensor, features: int) -> torch.Tensor:
    """``[..., 2 * features]`` sin/cos features of integer positions at geometric frequencies."""
    freqs = torch.exp(-math.log(1e4) * torch.arange(features, device=values.device, dtype=torch.float32) / features)
    angles = values.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


def grid_coordinates(prep: PreparedInputs) -> torch.Tensor:
    """``[B, L, 2]`` (row, col) of each visual token in its sample's grid (0 where unknown or text)."""
    batch = prep.input_ids.shape[0]
    device = prep.input_ids.device
    counts = prep.visual_mask.sum(1).tolist()
    grids = prep.visual_grids or [None] * batch
    known = [grid is not None and grid[0] * grid[1] == n for grid, n in zip(grids, counts)]
    cols = torch.tensor([int(grid[1]) if ok else 1 for grid, ok in zip(grids, known)], device=device)[:, None]
    use = prep.visual_mask & torch.tensor(known, dtype=torch.bool, device=device)[:, None]
    j = prep.visual_mask.long().cumsum(1) - 1  # each visual token's place in its sample's grid, row-major
    return torch.stack([j // cols + 1, j % cols + 1], -1) * use[..., None]


class Router(nn.Module):
    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.norm_in = nn.LayerNorm(c.lm_hidden)
        self.project = nn.Linear(c.lm_hidden, c.width)
        self.kind = nn.Embedding(2, c.width)  # 0 text, 1 visual
        self.positions = nn.Linear(2 * c.position_features * (c.position_axes + 2), c.width)
        self.layer_tokens = nn.Parameter(torch.randn(c.n_layers, c.width) * 0.02)
        self.budget = nn.Sequential(nn.Linear(2, c.width), nn.GELU(), nn.Linear(c.width, c.width))
        layer = nn.TransformerEncoderLayer(c.width, c.heads, c.ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(c.width)
        self.token_head = nn.Linear(c.width, 1)
        if c.question_head:  # a visual token's logit gains <query(last token), key(token)> / sqrt(width)
            self.query = nn.Linear(c.width, c.width)
            self.key = nn.Linear(c.width, c.width)
        self.layer_head = nn.Linear(c.width, 1)

    def forward(self, prep: PreparedInputs, tokens: torch.Tensor | float, layers: torch.Tensor | float) -> RouterOutput:
        """Scores for a prepared batch at the requested shares of visual tokens and layers kept
        (floats or ``[B]`` tensors). ``prep.inputs_embeds`` holds what the router reads: the input of
        its token layer (the caller swaps in layer K's hidden states for K >= 1)."""
        c = self.config
        embeds = prep.inputs_embeds.detach().to(self.project.weight.dtype)  # the LVLM stays frozen
        batch, length = embeds.shape[:2]
        axes = prep.position_ids.permute(1, 2, 0)  # [B, L, A]
        feats = torch.cat([axes, grid_coordinates(prep)], -1)
        pos = sinusoid(feats, c.position_features).flatten(2)
        x = self.project(self.norm_in(embeds)) + self.kind(prep.visual_mask.long()) + self.positions(pos)
        shares = torch.stack([torch.as_tensor(tokens, dtype=x.dtype).expand(batch), torch.as_tensor(layers, dtype=x.dtype).expand(batch)], -1)
        extra = torch.cat([self.layer_tokens.expand(batch, -1, -1), self.budget(shares.to(x.device))[:, None]], 1)
        x = torch.cat([x, extra], 1)
        pad = torch.cat([~prep.attention_mask, torch.zeros(batch, extra.shape[1], dtype=torch.bool, device=x.device)], 1)
        h = self.norm_out(self._encode(x, pad))
        token_scores = self.token_head(h[:, :length]).squeeze(-1)  # [B, L]
        if c.question_head:
            last = (torch.arange(length, device=x.device) * prep.attention_mask).argmax(1)  # each sample's last real token
            query = self.query(h[torch.arange(batch, device=x.device), last])  # [B, W]
            token_scores = token_scores + (self.key(h[:, :length]) @ query[:, :, None]).squeeze(-1) / math.sqrt(c.width)
        layer_logits = self.layer_head(h[:, length : length + c.n_layers]).squeeze(-1)
        counts = prep.n_visual
        width = max(counts) if counts else 0
        token_logits = torch.full((batch, width), float("-inf"), dtype=x.dtype, device=x.device)
        b_idx, t_idx = prep.visual_mask.nonzero(as_tuple=True)  # visual tokens, in sequence order per sample
        place = prep.visual_mask.long().cumsum(1) - 1
        token_logits[b_idx, place[b_idx, t_idx]] = token_scores[b_idx, t_idx]
        return RouterOutput(token_logits, layer_logits, counts, prep.visual_grids, c.balanced)

    def _encode(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """The encoder over `x` with padding keys `pad`, always on PyTorch's plain path (the one training
        runs): its fused inference path is 3.5x slower on a padded CPU batch (its masked softmax)."""
        fused = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.encoder(x, src_key_padding_mask=pad)
        finally:
            torch.backends.mha.set_fastpath_enabled(fused)

    def macs(self, prep: PreparedInputs) -> torch.Tensor:
        """``[B]`` multiply-adds of one routing pass per sample (matrix products, as the accountant counts)."""
        c = self.config
        n_real = prep.attention_mask.sum(1).double()
        n = n_real + c.n_layers + 1
        per_layer = 4 * n * c.width**2 + 2 * n * n * c.width + 2 * n * c.width * c.ffn
        inputs = n_real * (c.lm_hidden + 2 * c.position_features * (c.position_axes + 2)) * c.width
        budget = 2 * c.width + c.width**2
        heads = n_real + c.n_layers
        question = (n_real + 1) * c.width**2 + n_real * c.width if c.question_head else 0
        return inputs + c.depth * per_layer + budget + heads * c.width + question
