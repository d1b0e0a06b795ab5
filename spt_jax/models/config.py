"""One frozen config for every decoder-only family.

A Hugging Face ``config.json`` (through transformers' config classes) and GGUF metadata both build
this object, so the model code never looks at where the weights came from. Families differ only in
the switches below; `spt_jax.models.families` maps each ``model_type`` onto them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import numpy as np

from spt_jax.errors import ConfigError

Norm = Literal["rms", "layer"]
Activation = Literal["silu", "gelu_tanh", "gelu"]
Position = Literal["rope", "learned"]
LayerKind = Literal["global", "sliding"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding for one attention kind (global or sliding layers).

    ``kind`` follows transformers' ``rope_type``: "default", "linear" or "llama3".
    """

    theta: float = 10_000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies ``[head_dim // 2]`` in float64, as transformers computes them."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled)
        return inv


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a frozen decoder-only LM. Shapes use D=d_model, H=n_heads, K=n_kv_heads."""

    model_type: str  # transformers' model_type, e.g. "llama", "qwen3", "gemma3_text", "gpt2"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_position_embeddings: int
    norm: Norm = "rms"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma scales by (1 + w)
    activation: Activation = "silu"
    gated_mlp: bool = True  # SwiGLU/GeGLU; GPT-2 has a plain two-layer MLP
    attn_bias: bool = False  # q/k/v projection bias (Qwen2, GPT-2, Llama attention_bias)
    attn_out_bias: bool = False  # attention output bias (GPT-2, Llama attention_bias)
    mlp_bias: bool = False  # MLP biases (GPT-2, Llama mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma 2/3)
    position: Position = "rope"
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # sliding layers' own rope (Gemma 3)
    sliding_window: int | None = None
    layer_kinds: tuple[LayerKind, ...] = ()  # per layer; empty means all global
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scale: float | None = None  # None -> head_dim ** -0.5
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(D)
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"model config {self.model_type!r}: {name}={value!r}; expected an integer >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config {self.model_type!r}: n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads} (each key/value head serves a whole group of query heads)"
            )
        if self.layer_kinds and len(self.layer_kinds) != self.n_layers:
            raise ConfigError(
                f"model config {self.model_type!r}: layer_kinds has {len(self.layer_kinds)} entries for "
                f"{self.n_layers} layers"
            )
        if "sliding" in self.layer_kinds and not self.sliding_window:
            raise ConfigError(f"model config {self.model_type!r}: sliding layers need a sliding_window")

    @functools.cached_property
    def kinds(self) -> tuple[LayerKind, ...]:
        """Per-layer attention kind, all "global" unless the family says otherwise."""
        return self.layer_kinds or ("global",) * self.n_layers

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    @property
    def n_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        attn = self.d_model * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = self.d_model * self.d_ff * (3 if self.gated_mlp else 2)
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        pos = self.max_position_embeddings * self.d_model if self.position == "learned" else 0
        return self.n_layers * (attn + mlp) + embed + pos

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
