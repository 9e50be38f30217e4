"""SDXL's CLIP text encoders: CLIP-L (`text_encoder`) and OpenCLIP bigG (`text_encoder_2`).

One causal pre-LayerNorm transformer (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision") whose parameter names equal transformers' checkpoint keys
(`text_model.*`, plus `text_projection.weight` for bigG), so HF weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.models.configs import CLIPTextConfig

# Keys some SDXL checkpoints carry that hold no learned state; drop them before a strict load.
IGNORED_KEYS = ("text_model.embeddings.position_ids",)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (CLIP-L was trained with it)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention (text tokens only see earlier tokens)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (
            proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, D/heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # SDXL uses no padding mask
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    """Position-wise feed-forward block."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu  # exact erf GELU
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of blocks; kept as a module so keys read `encoder.layers.N`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(
            input_ids.shape[1], device=input_ids.device
        )  # no buffer: meta-safe
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final LayerNorm: transformers' `text_model`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder returning what SDXL conditions on: an inner hidden state and the pooled EOS."""

    config_class = CLIPTextConfig  # what sdxl.weights reads config.json into

    @staticmethod
    def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What sdxl.weights applies to a checkpoint before the strict load."""
        return convert_transformers_state_dict(sd)

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.with_projection:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (hidden_states[-(skip+1)] (B, T, D), pooled (B, D or P)) as transformers names them.

        skip=1 is the penultimate layer SDXL uses (diffusers' clip_skip=None); the hidden state
        excludes the final LayerNorm; pooled is final-normed at the EOS token and projected for bigG.
        """
        n_layers = self.config.num_hidden_layers
        if not 0 <= skip <= n_layers:
            raise ValueError(f"skip must be in [0, {n_layers}], got {skip}")
        tm = self.text_model
        x = tm.embeddings(input_ids)  # (B, T, D)
        states = [x]  # transformers' hidden_states: embeddings, then every layer's output
        for layer in tm.encoder.layers:
            x = layer(x)
            states.append(x)
        batch = torch.arange(x.shape[0], device=x.device)
        pooled = tm.final_layer_norm(x)[batch, self._eos_index(input_ids)]  # (B, D)
        if self.config.with_projection:
            pooled = self.text_projection(pooled)  # (B, P)
        return states[-(skip + 1)], pooled

    def _eos_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position of the EOS token, by transformers' rule for legacy (eos=2) and fixed configs."""
        ids = input_ids.to(torch.int)
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)  # legacy configs: EOS has the highest id in the vocabulary
        first_eos = (ids == self.config.eos_token_id).int()  # pad may equal EOS: take the first
        return first_eos.argmax(dim=-1)


def convert_transformers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers CLIP text state dict to our keys.

    Drops IGNORED_KEYS and restores the `text_model.` prefix that transformers >= 5 leaves out
    when it saves a bare CLIPTextModel (SDXL's own checkpoints keep it).
    """
    out = {}
    for key, value in sd.items():
        if key in IGNORED_KEYS or f"text_model.{key}" in IGNORED_KEYS:
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = f"text_model.{key}"
        out[key] = value
    return out
