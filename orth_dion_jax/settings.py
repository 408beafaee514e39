"""Every setting of the optimizers, declared once.

A setting is a field of one frozen dataclass here: its name, default, type,
one-line meaning and eager check live together. The public functions
(``orth_dion``, ``dion``, ``scale_by_orth_dion``, ...) take the settings of
the groups they use as keyword arguments; ``accepts`` gives each of them the
signature and the "Settings" section of its docstring from these fields, so
``help(orth_dion)`` and ``inspect.signature`` list every keyword with its
default, and a setting added or changed here reaches every function that
uses its group. The groups:

* ``LowRankCompressor``: the low-rank step (rank, right factor, method, ...);
* ``ErrorFeedback``: Dion's momentum around it (its form, mu or beta,
  momentum dtype);
* ``MatrixAxes``: which axes of each weight are its matrix and which stack
  layers;
* ``Placement``: the mesh the weights are sharded over, compressed data
  parallelism;
* ``OtherLeaves``: weight decay, routing labels and AdamW for everything that
  is not a hidden weight matrix (the optimizer aliases only).

A function that fixes a setting (``dion`` always uses the column-normalized
right factor) leaves it out of its signature: ``dion(right_factor="qr")`` is a
``TypeError``, not a silent Orth-Dion. A setting that belongs to a choice
the user did not make (``beta`` with the mu-form) is an error, not ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import textwrap
import typing
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from orth_dion_jax import low_rank
from orth_dion_jax import matrix_view
from orth_dion_jax import orthogonalize
from orth_dion_jax import sharding
from orth_dion_jax import validation

ScalarOrSchedule = optax.ScalarOrSchedule


def _setting(default: Any, doc: str, *, static: bool = False) -> Any:
  """A field: its default, its meaning, and whether it sets shapes, seeds or
  structure (``static``: it must stay a Python value under jit and
  ``optax.inject_hyperparams``)."""
  return dataclasses.field(default=default,
                           metadata={"doc": doc, "static": static})


# Adaptive rank's estimate when not given: the share of the buffer's energy
# that defines the effective rank, and the decay of its moving average.
_DEFAULT_RANK_ENERGY = 0.9
_DEFAULT_RANK_EMA = 0.9


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankCompressor:
  """The low-rank orthonormalized step's static configuration."""
  rank_fraction: float = _setting(
      0.25, "r = ceil(rank_fraction * min(fan_in, fan_out)).", static=True)
  rank: int | None = _setting(
      None, "explicit rank; overrides rank_fraction (clipped per matrix).",
      static=True)
  rank_multiple_of: int = _setting(
      1, "the r from rank_fraction is rounded up to a multiple of this (an "
      "explicit rank is used as given).", static=True)
  right_factor: low_rank.RightFactor = _setting(
      "qr", '"qr" (Orth-Dion: sign-safe QR), "polar" (the exact rank-r '
      "polar factor: the update is polar(P P^T B)) or \"column\" (Dion: "
      "column normalization; orth_dion takes qr or polar, dion fixes "
      "column).")
  orthogonalize: orthogonalize.Method = _setting(
      "cholesky_qr", " | ".join(f'"{m}"' for m in orthogonalize.METHODS)
      + ": how P and the QR right factor are orthonormalized "
      "(docs/design.md, \"The orthonormalization methods\").", static=True)
  power_iters: int = _setting(1, "power iterations per step (1 in the papers).",
      static=True)
  eps: ScalarOrSchedule = _setting(
      1e-8, "epsilon of Dion's column normalization (float or schedule).")
  scale: matrix_view.Scale = _setting(
      "spectral", '"spectral" (sqrt(fan_out / fan_in)), "rms" '
      "(0.2 sqrt(max(fan_in, fan_out))), a float, or None (1).", static=True)
  seed: int = _setting(
      0, "seeds the initial right factors and randomized sketches; the same "
      "seed gives the same factors on every replica and host.", static=True)
  adaptive_rank: bool = _setting(
      False, "Ada-Orth-Dion: the state also carries each matrix's smoothed "
      "effective rank and the energy of its right factor's directions, and "
      "the step takes the rank its right factor holds; "
      "orth_dion_jax.RankController changes the ranks between steps "
      "(docs/design.md, \"Adaptive rank\").", static=True)
  rank_energy: float | None = _setting(
      None, "adaptive rank: a matrix's effective rank is the smallest k whose "
      f"top k directions hold this share of B's energy. None: "
      f"{_DEFAULT_RANK_ENERGY}.", static=True)
  rank_ema: float | None = _setting(
      None, "adaptive rank: decay of the effective rank's moving average. "
      f"None: {_DEFAULT_RANK_EMA}.", static=True)

  def __post_init__(self):
    validation.check_rank_arguments(self.rank, self.rank_fraction,
                                    self.rank_multiple_of)
    validation.check_choice("right_factor", self.right_factor,
                            low_rank.RIGHT_FACTORS)
    validation.check_choice("orthogonalize", self.orthogonalize,
                            orthogonalize.METHODS)
    validation.check_positive_int("power_iters", self.power_iters)
    validation.check_seed(self.seed)
    validation.check_scale(self.scale)
    validation.check_nonnegative("eps", self.eps)
    validation.check_static_bool("adaptive_rank", self.adaptive_rank)
    for name in ("rank_energy", "rank_ema"):
      if getattr(self, name) is not None and not self.adaptive_rank:
        raise ValueError(f"{name} applies to adaptive_rank=True; pass "
                         "adaptive_rank=True or leave it out.")
    if self.rank_energy is not None:
      validation.check_static_fraction("rank_energy", self.rank_energy,
                                       closed_left=False, closed_right=True)
    if self.rank_ema is not None:
      validation.check_static_fraction("rank_ema", self.rank_ema,
                                       closed_left=True, closed_right=False)

  @property
  def rank_estimate(self) -> tuple[float, float]:
    """``(rank_energy, rank_ema)`` of adaptive rank, defaults filled in."""
    return (_DEFAULT_RANK_ENERGY if self.rank_energy is None
            else self.rank_energy,
            _DEFAULT_RANK_EMA if self.rank_ema is None else self.rank_ema)

  @property
  def step_config(self) -> low_rank.LowRankConfig:
    return low_rank.LowRankConfig(
        right_factor=self.right_factor, orthogonalize=self.orthogonalize,
        power_iters=self.power_iters)

  def view(self, path: str, shape, dims: matrix_view.DionDimensionNumbers,
           *, rank: int | None = None) -> matrix_view.MatrixView:
    """The weight at ``path`` seen as matrices, with this compressor's rank
    (or ``rank``: the one an adaptive state holds)."""
    return matrix_view.matrix_view(
        path, tuple(shape), dims, rank=self.rank if rank is None else rank,
        rank_fraction=self.rank_fraction,
        rank_multiple_of=self.rank_multiple_of, scale=self.scale)


ErrorFeedbackForm = Literal["mu", "beta"]
ERROR_FEEDBACK_FORMS = typing.get_args(ErrorFeedbackForm)
# mu and beta when not given (the reference's mu; the paper states no beta).
_DEFAULT_DECAY = 0.95


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorFeedback:
  """Dion's momentum with error feedback around the low-rank step."""
  error_feedback: ErrorFeedbackForm = _setting(
      "mu", '"mu" (the reference form: B = M + G, M <- B - (1 - mu) P R^T) '
      'or "beta" (the paper\'s: B = G + E, E <- beta (B - P R^T), nothing '
      "of the captured part carried).", static=True)
  mu: ScalarOrSchedule | None = _setting(
      None, "mu-form: decay of the captured part, in [0, 1) (float or "
      f"schedule). None: {_DEFAULT_DECAY}.")
  beta: ScalarOrSchedule | None = _setting(
      None, "beta-form: decay of the residual, in [0, 1] (float or "
      f"schedule). None: {_DEFAULT_DECAY}.")
  momentum_dtype: Any = _setting(
      None, "dtype of the momentum, e.g. jnp.bfloat16 (None: the "
      "parameter's); the factorizations run in float32 regardless.",
      static=True)

  def __post_init__(self):
    validation.check_choice("error_feedback", self.error_feedback,
                            ERROR_FEEDBACK_FORMS)
    # A decay of the other form would be ignored: say so instead.
    unused = "beta" if self.error_feedback == "mu" else "mu"
    if getattr(self, unused) is not None:
      raise ValueError(
          f"{unused} applies to error_feedback={unused!r}; with "
          f"error_feedback={self.error_feedback!r} give "
          f"{'mu' if unused == 'beta' else 'beta'} instead.")
    if self.mu is not None:
      validation.check_unit_interval("mu", self.mu, closed_right=False)
    if self.beta is not None:
      validation.check_unit_interval("beta", self.beta, closed_right=True)
    validation.check_float_dtype("momentum_dtype", self.momentum_dtype)

  @property
  def decays(self) -> tuple[ScalarOrSchedule, ScalarOrSchedule]:
    """``(residual_decay, captured_decay)`` of ``scale_by_error_feedback``:
    the mu-form keeps the residual whole and decays the captured part by mu;
    the beta-form decays the residual by beta and drops the captured part."""
    if self.error_feedback == "beta":
      return (_DEFAULT_DECAY if self.beta is None else self.beta, 0.0)
    return (1.0, _DEFAULT_DECAY if self.mu is None else self.mu)

  @property
  def dtype(self) -> jnp.dtype | None:
    return None if self.momentum_dtype is None else jnp.dtype(
        self.momentum_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatrixAxes:
  """Which axes of each weight form its matrix."""
  weight_dimension_numbers: Any = _setting(
      None, "tree (or callable of the parameters) of DionDimensionNumbers "
      "(or optax.contrib.MuonDimensionNumbers) for low-rank leaves and None "
      "for AdamW ones; None: the default routing.", static=True)
  layer_axes: int = _setting(
      0, "leading axes that stack layers (nnx.scan / nnx.vmap models): a "
      "leaf with 2 + layer_axes axes is a stack of (fan_in, fan_out) "
      "matrices, each with its own factors. Applies to the default "
      "dimension numbers only.", static=True)

  def __post_init__(self):
    validation.check_static_int("layer_axes", self.layer_axes)
    if self.layer_axes < 0:
      raise ValueError(f"layer_axes must be >= 0, got {self.layer_axes}.")
    if self.layer_axes and self.weight_dimension_numbers is not None:
      raise TypeError(
          "layer_axes applies to the default dimension numbers; with "
          "weight_dimension_numbers, make the layer axes batch axes there "
          "(axes in neither reduction_axis nor output_axis).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
  """Where the weights live: the mesh and how each weight is sharded."""
  mesh: jax.sharding.Mesh | None = _setting(
      None, "the mesh the parameters are sharded over; None: read from the "
      "parameters (an Explicit mesh, concrete arrays or jax.set_mesh). The "
      "low-rank step then runs under jax.shard_map on each device's blocks.",
      static=True)
  param_specs: Any = _setting(
      None, "tree (or callable of the parameters) of PartitionSpec or "
      "NamedSharding; None: read from the arrays or their types. Needed "
      "under jit with Auto mesh axes.", static=True)
  data_axis: str | None = _setting(
      None, "mesh axis of compressed data parallelism: gradients carry a "
      "leading replica axis (per_replica_value_and_grad) and only the "
      "low-rank factors are averaged across it.", static=True)

  def __post_init__(self):
    if self.mesh is not None and not isinstance(
        self.mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
      raise TypeError("mesh must be a jax.sharding.Mesh (e.g. from "
                      f"jax.make_mesh), got {type(self.mesh).__name__}.")
    if self.mesh is None and (self.data_axis is not None
                              or self.param_specs is not None):
      raise ValueError("data_axis and param_specs need mesh= (the mesh the "
                       "parameters are sharded over).")
    if self.data_axis is not None:
      sharding.replica_count(self.mesh, self.data_axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OtherLeaves:
  """Weight decay, routing labels, and AdamW for the non-matrix leaves."""
  weight_decay: ScalarOrSchedule = _setting(
      0.01, "decoupled weight decay of the low-rank matrices.")
  param_labels: Any = _setting(
      None, 'tree (or callable of the parameters) of "low_rank" / "adam" '
      "labels; overrides the default routing.", static=True)
  adam_learning_rate: ScalarOrSchedule | None = _setting(
      None, "AdamW's learning rate (None: the low-rank learning rate).")
  adam_b1: float = _setting(0.95, "AdamW's first-moment decay.")
  adam_b2: float = _setting(0.98, "AdamW's second-moment decay.")
  adam_eps: float = _setting(1e-8, "AdamW's epsilon.")
  adam_weight_decay: ScalarOrSchedule = _setting(
      0.0, "AdamW's decoupled weight decay.")

  def __post_init__(self):
    if self.adam_learning_rate is not None:
      validation.check_nonnegative("adam_learning_rate",
                                   self.adam_learning_rate)
    for name in ("weight_decay", "adam_weight_decay", "adam_eps"):
      validation.check_nonnegative(name, getattr(self, name))
    for name in ("adam_b1", "adam_b2"):
      validation.check_unit_interval(name, getattr(self, name),
                                     closed_right=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankPolicy:
  """When and how far ``RankController`` changes an adaptive rank."""
  min_rank: int = _setting(8, "no rank goes below this (nor above the "
                           "matrix's smaller side).", static=True)
  max_rank: int | None = _setting(
      None, "no rank goes above this; None: the rank the matrix started "
      "with.", static=True)
  multiple_of: int = _setting(
      8, "ranks are multiples of this (hardware tiles), except at the "
      "bounds.", static=True)
  hysteresis: float = _setting(
      4.0, "a rank shrinks only when the effective rank plus this is a "
      "multiple below it, and grows when the effective rank exceeds it, so "
      "an estimate near a multiple does not flap.", static=True)
  interval: int = _setting(
      100, "steps between decisions (the first after this many): at most one "
      "change, hence one recompile, per interval.", static=True)

  def __post_init__(self):
    validation.check_positive_int("min_rank", self.min_rank)
    if self.max_rank is not None:
      validation.check_positive_int("max_rank", self.max_rank)
      if self.max_rank < self.min_rank:
        raise ValueError(f"max_rank ({self.max_rank}) must be >= min_rank "
                         f"({self.min_rank}).")
    validation.check_positive_int("multiple_of", self.multiple_of)
    validation.check_positive_int("interval", self.interval)
    validation.check_static_real("hysteresis", self.hysteresis)
    validation.check_nonnegative("hysteresis", self.hysteresis)


def _fields(groups, omit) -> list[dataclasses.Field]:
  """The groups' fields, those named in ``omit`` left out."""
  return [f for g in groups for f in dataclasses.fields(g)
          if f.name not in omit]


def accepts(*groups: type, omit: dict[str, str] | None = None) -> Callable:
  """Gives a ``def f(..., **settings)`` the groups' fields as keywords.

  The signature (``inspect.signature``, ``help``) lists the function's own
  parameters, then every field of ``groups`` except those in ``omit``,
  keyword-only, with its default; the docstring gains a "Settings" section
  with each field's meaning. The function reads them with ``parse``. ``omit``
  maps each left-out setting to what the error for it says instead.
  """
  omit = omit or {}

  def decorate(fn: Callable) -> Callable:
    fields = _fields(groups, omit)
    own = [p for p in inspect.signature(fn).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fn.__signature__ = inspect.signature(fn).replace(parameters=own + [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                          default=f.default) for f in fields])
    lines = [f"{f.name}: {f.metadata['doc']} Default: {f.default!r}."
             for f in fields]
    section = "\n".join(textwrap.fill(
        line, 76, initial_indent="  ", subsequent_indent="    ")
        for line in lines)
    fn.__doc__ = (inspect.cleandoc(fn.__doc__ or "")
                  + "\n\nSettings (keyword arguments):\n" + section + "\n")
    fn.__orth_dion_settings__ = (groups, omit)
    return fn
  return decorate


def parse(fn: Callable, settings: dict[str, Any], *,
          fixed: dict[str, Any] | None = None) -> dict[type, Any]:
  """The groups ``fn`` accepts (see ``accepts``), built from its keywords.

  Raises:
    TypeError: naming ``fn`` and the closest valid keyword, for a keyword
      that is not one of ``fn``'s settings.
  """
  groups, omit = fn.__orth_dion_settings__
  known = {f.name for f in _fields(groups, omit)}
  for name in settings:
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else "."
      if name in omit:
        hint = f": {omit[name]}."
      raise TypeError(f"{fn.__name__}() got an unexpected keyword argument "
                      f"{name!r}{hint}")
  given = {**settings, **(fixed or {})}
  return {g: g(**{f.name: given[f.name] for f in dataclasses.fields(g)
                  if f.name in given}) for g in groups}


# Settings that set shapes, seeds or structure: under optax.inject_hyperparams
# they must stay Python values, e.g.
# ``optax.inject_hyperparams(orth_dion, static_args=STATIC_ARGS)``.
STATIC_ARGS = tuple(
    f.name for g in (LowRankCompressor, ErrorFeedback, MatrixAxes, Placement,
                     OtherLeaves)
    for f in dataclasses.fields(g) if f.metadata["static"])
