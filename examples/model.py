"""A small decoder-only byte-level transformer in Flax NNX, and the optimizer routing for it.

The architecture is the LLaMA recipe at toy scale: pre-norm residual blocks of RMSNorm, causal
self-attention with rotary position embeddings, and a SwiGLU MLP; untied input embedding and
output head. Attention projections keep their head axes (kernels of shape (d_model, heads,
head_dim) and (heads, head_dim, d_model)), so the optimizer sees N-D weights and must be told which
axes are the matrix's rows and columns: `dimension_numbers` below does that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from examples.cli import integer, setting

VOCAB_SIZE = 256  # bytes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's shape; its settings are flags of examples.train (examples/cli.py)."""
  d_model: int = setting(96, "model width", parse=integer(1))
  n_layers: int = setting(3, "number of transformer blocks", parse=integer(1))
  n_heads: int = setting(3, "attention heads: must divide --d-model into an even head dimension",
                         parse=integer(1))
  # None: 3 * d_model, filled in at construction.
  mlp_hidden: int | None = setting(None, "SwiGLU hidden width (default: 3 * d_model)",
                                   parse=integer(1))
  rope_base: float = 10_000.0

  def __post_init__(self):
    if self.mlp_hidden is None:
      object.__setattr__(self, "mlp_hidden", 3 * self.d_model)
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if (self.d_model // self.n_heads) % 2:
      raise ValueError("rotary embeddings need an even head dimension, got "
                       f"{self.d_model // self.n_heads}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotation angles, each (seq_len, head_dim // 2)."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + D/2]) of x: (batch, seq, heads, D) by position."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class CausalSelfAttention(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    heads = (config.n_heads, config.head_dim)
    self.q_proj = nnx.LinearGeneral(config.d_model, heads, use_bias=False, rngs=rngs)
    self.k_proj = nnx.LinearGeneral(config.d_model, heads, use_bias=False, rngs=rngs)
    self.v_proj = nnx.LinearGeneral(config.d_model, heads, use_bias=False, rngs=rngs)
    self.o_proj = nnx.LinearGeneral(heads, config.d_model, axis=(-2, -1), use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    q = apply_rotary(self.q_proj(x), cos, sin)
    k = apply_rotary(self.k_proj(x), cos, sin)
    attended = jax.nn.dot_product_attention(q, k, self.v_proj(x), is_causal=True)
    return self.o_proj(attended)


class SwiGLU(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.gate = nnx.Linear(config.d_model, config.mlp_hidden, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(config.d_model, config.mlp_hidden, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(config.mlp_hidden, config.d_model, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.attention_norm = nnx.RMSNorm(config.d_model, rngs=rngs)
    self.attention = CausalSelfAttention(config, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(config.d_model, rngs=rngs)
    self.mlp = SwiGLU(config, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Byte-level decoder: int tokens (batch, seq) -> next-byte logits (batch, seq, 256)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(VOCAB_SIZE, config.d_model,
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.final_norm = nnx.RMSNorm(config.d_model, rngs=rngs)
    self.lm_head = nnx.Linear(config.d_model, VOCAB_SIZE, use_bias=False,
                              kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cos, sin = rotary_tables(tokens.shape[1], self.config.head_dim, self.config.rope_base)
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, cos, sin)
    return self.lm_head(self.final_norm(x))


def cross_entropy(model: Transformer, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-byte negative log-likelihood in nats, computed in float32."""
  logits = model(inputs).astype(jnp.float32)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))


# Which axes of each spectral-optimizer weight are its rows (reduction = fan_in) and columns
# (output = fan_out); every other weight (embedding, head, norm scales) goes to AdamW.
_MATRIX_AXES = {
    "q_proj": (0, (1, 2)),
    "k_proj": (0, (1, 2)),
    "v_proj": (0, (1, 2)),
    "o_proj": ((0, 1), 2),
    "gate": (0, 1),
    "up": (0, 1),
    "down": (0, 1),
}


def _map_kernels(fn: Callable[[Any], Any], params: Any) -> Any:
  """fn(axes or None) at each leaf of `params`, keyed by the name of the module owning it.

  Works on the `nnx.State` of Params that `nnx.Optimizer` hands to `init` as well as on the plain
  arrays it hands to `update`.
  """

  def at_leaf(path, leaf):
    del leaf
    module, name = (getattr(key, "key", None) for key in path[-2:])
    return fn(_MATRIX_AXES.get(module) if name == "kernel" else None)

  return jax.tree_util.tree_map_with_path(
      at_leaf, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


# How train.py shards each weight over the "fsdp" and "tensor" mesh axes: the model width over
# fsdp, and attention heads, MLP hidden units and the vocabulary over tensor (Megatron-style tensor
# parallelism inside FSDP). Heads stay the leading axis of a projection's flattened side, the only
# one of them Orth-Dion's sharded step may split. Norm scales are replicated.
_PARTITIONING = {
    "q_proj": ("fsdp", "tensor", None),
    "k_proj": ("fsdp", "tensor", None),
    "v_proj": ("fsdp", "tensor", None),
    "o_proj": ("tensor", None, "fsdp"),
    "gate": ("fsdp", "tensor"),
    "up": ("fsdp", "tensor"),
    "down": ("tensor", "fsdp"),
    "embed": (None, "fsdp"),
    "lm_head": ("fsdp", "tensor"),
}


def partition_specs(state: Any) -> Any:
  """A `PartitionSpec` for every leaf of a model's state (an `nnx.State` or its pure arrays)."""
  return specs_by_module(state, _PARTITIONING)


def specs_by_module(state: Any, partitioning: dict[str, tuple]) -> Any:
  """A `PartitionSpec` for every leaf of `state`: `partitioning[name]` for a leaf owned by a
  module named `name`, replicated for the rest."""

  def at_leaf(path, leaf):
    del leaf
    module = getattr(path[-2], "key", None) if len(path) > 1 else None
    return PartitionSpec(*partitioning.get(module, ()))

  return jax.tree_util.tree_map_with_path(
      at_leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def dimension_numbers(params: Any, numbers_class: Callable[..., Any]) -> Any:
  """`numbers_class(reduction_axis, output_axis)` for attention and MLP kernels, None elsewhere.

  `numbers_class` is `orth_dion_jax.DionDimensionNumbers` or `optax.contrib.MuonDimensionNumbers`.
  """
  return _map_kernels(lambda axes: None if axes is None else numbers_class(*axes), params)


def hidden_matrix_mask(params: Any) -> Any:
  """True for attention and MLP kernels: the weights that get decoupled weight decay."""
  return _map_kernels(lambda axes: axes is not None, params)
