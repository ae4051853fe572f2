"""Text encoder: an open_clip tokenizer and text tower giving per-token and pooled embeddings.

Our presets use small open_clip model configs registered from ``model/configs/*.json``; a user may instead
name a standard open_clip architecture (for example ``ViT-B-32``) together with a local checkpoint file.
Nothing here ever downloads weights: hub tags are refused with a message that says which file to supply.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
from open_clip.transformer import text_global_pool

from model.config import TextConfig

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_configs() -> None:
    """Make our open_clip model configs (model/configs/*.json) known to open_clip by name."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, D) per-token embeddings
    mask: torch.Tensor  # (B, L) True where a token is real (up to and including end-of-text)
    pooled: torch.Tensor  # (B, E) the CLIP text embedding

    def to(self, device=None, dtype=None) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device=device, dtype=dtype), self.mask.to(device),
                             self.pooled.to(device=device, dtype=dtype))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def cat(parts: list["TextEmbedding"]) -> "TextEmbedding":
        return TextEmbedding(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                             torch.cat([p.pooled for p in parts]))


class TextEncoder(nn.Module):
    """Wraps an open_clip CLIP model; the vision tower is kept for contrastive training only."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        register_configs()
        if open_clip.get_model_config(cfg.model_name) is None:
            raise ValueError(f"text.model_name: unknown open_clip model {cfg.model_name!r}; "
                             f"ours: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}, "
                             "or a standard open_clip name such as 'ViT-B-32'")
        pretrained = None
        if cfg.pretrained is not None:
            path = Path(cfg.pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"text.pretrained: open_clip checkpoint {str(path)!r} does not exist; weights are never "
                    "downloaded: copy the checkpoint file there, or train our text encoder with "
                    "`longshot train text --preset demo`")
            pretrained = str(path)
        self.cfg = cfg
        self.clip = open_clip.create_model(cfg.model_name, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name)
        self.context_length = self.clip.context_length if hasattr(self.clip, "context_length") else 77

    @property
    def width(self) -> int:
        """Dimension of per-token embeddings."""
        if hasattr(self.clip, "text"):
            return self.clip.text.width
        return self.clip.transformer.width

    @property
    def embed_dim(self) -> int:
        """Dimension of the pooled embedding."""
        proj = getattr(self.clip, "text_projection", None)
        if proj is None:
            return self.clip.text.text_projection.shape[1]
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, L); over-long prompts are truncated with a warning, never an error."""
        limit = self.context_length - 2  # start and end-of-text tokens
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            for prompt in prompts:
                n = len(encode(prompt))
                if n > limit:
                    warnings.warn(f"prompt: {n} tokens exceed the text encoder's limit of {limit}; "
                                  f"truncated: {prompt[:60]!r}...", stacklevel=3)
        return self.tokenizer(prompts)

    def forward(self, tokens: torch.Tensor) -> TextEmbedding:
        clip = self.clip
        if hasattr(clip, "text"):  # open_clip's CustomTextCLIP
            clip.text.output_tokens = True
            pooled, per_token = clip.text(tokens)
        else:
            cast = clip.transformer.get_cast_dtype()
            x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)  # (B, L, W)
            x = clip.transformer(x, attn_mask=clip.attn_mask)
            per_token = clip.ln_final(x)
            pooled = text_global_pool(per_token, tokens, clip.text_pool_type,
                                      eos_token_id=getattr(clip, "text_eos_id", None))
            if isinstance(pooled, tuple):
                pooled = pooled[0]
            proj = clip.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        # Tokens after end-of-text are padding: the end token has the largest id in CLIP's vocabulary.
        eot = tokens.argmax(dim=-1, keepdim=True)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot
        return TextEmbedding(per_token, mask, pooled)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        device = next(self.parameters()).device
        return self(self.tokenize(list(prompts)).to(device))

    def contrastive_logits(self, tokens: torch.Tensor, images: torch.Tensor):
        """(image_features, text_features, logit_scale) for open_clip's ClipLoss."""
        out = self.clip(images, tokens)
        if isinstance(out, dict):
            return out["image_features"], out["text_features"], out["logit_scale"]
        return out[0], out[1], out[2]
