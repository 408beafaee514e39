"""Which parameters get the low-rank step and which get AdamW.

Orth-Dion is for the linear maps between hidden spaces. By default
(``default_param_labels``) a leaf is ``"low_rank"`` when it is a matrix
(2-D, or ``2 + layer_axes``-D for layers stacked by ``nnx.scan`` /
``nnx.vmap``) and no component of its path names

* an embedding table or the output head: ``embed`` anywhere in the name
  (``unembed`` included), ``wte``, ``wpe``, ``head``, ``lm_head``,
  ``output_head``, ``logits``, or names starting with ``vocab``;
* a norm or a bias: ``norm`` anywhere in the name, names starting with
  ``ln`` (``ln_1``, ``ln_f``), ``scale`` or ``bias``.

Every other leaf is ``"adam"``, and so is every leaf that is not a real
floating-point array. ``weight_dimension_numbers`` (None for
AdamW) or ``param_labels`` decide otherwise; ``routing_summary`` shows the
result, leaf by leaf. Labels are read from the parameters, never from the
gradients, so a gradient of the wrong shape reaches its own
transformation's shape check instead of being routed elsewhere.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orth_dion_jax import matrix_view
from orth_dion_jax import nnx_interop
from orth_dion_jax import tree_views

LOW_RANK = "low_rank"
ADAM = "adam"

# Names matched case-insensitively against each component of a leaf's path.
_ADAM_BY_NAME = re.compile(
    r"(embed|^wte$|^wpe$|^(lm_|output_)?head$|^logits$|^vocab"
    r"|norm|^ln|^scale$|^bias$)", re.IGNORECASE)


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


def _named_for_adam(path) -> bool:
  return any(_ADAM_BY_NAME.search(n) for n in _path_names(path))


def default_param_labels(params: Any, layer_axes: int = 0) -> Any:
  """``"low_rank"`` for matrices not named like an embedding, head, norm or
  bias (see the module docstring); ``"adam"`` for everything else.

  Args:
    params: the parameters (arrays, shapes or NNX ``Variable``s).
    layer_axes: leading axes that stack layers.

  Example:
    >>> import jax.numpy as jnp
    >>> default_param_labels({"dense": jnp.ones((4, 8)), "bias": jnp.ones(8),
    ...                       "embed": jnp.ones((16, 4))})
    {'bias': 'adam', 'dense': 'low_rank', 'embed': 'adam'}
  """
  def label(path, x):
    is_matrix = (matrix_view.default_dimension_numbers(
        jnp.ndim(x), layer_axes) is not None
                 and jnp.issubdtype(jnp.result_type(x), jnp.floating))
    return LOW_RANK if is_matrix and not _named_for_adam(path) else ADAM
  return jax.tree_util.tree_map_with_path(label, nnx_interop.unboxed(params))


def warn_unrouted_weights(params: Any, labels: Any, layer_axes: int) -> None:
  """Warns, once per ``init``, about N-D leaves the default sends to AdamW.

  They may be weights that need dimension numbers (an attention kernel
  ``(d, heads, head_dim)``) or ``layer_axes`` (a scanned model's kernels): a
  silent AdamW would train them, just not with Orth-Dion.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  missed = [(jax.tree_util.keystr(p), jnp.shape(x))
            for (p, x), label in zip(flat, jax.tree.leaves(labels))
            if label == ADAM and jnp.ndim(x) > 2 and not _named_for_adam(p)
            and jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  if not missed:
    return
  stacked = ("; if their leading axis stacks layers (nnx.scan / nnx.vmap), "
             "pass layer_axes=1" if layer_axes == 0 and any(
                 len(shape) == 3 for _, shape in missed) else "")
  warnings.warn(
      f"orth_dion_jax: {len(missed)} leaves with more than 2 axes go to AdamW "
      f"by default, e.g. {missed[0][0]} of shape {missed[0][1]}. To give them "
      "the low-rank step, pass weight_dimension_numbers with their fan-in and "
      f"fan-out axes (README: attention kernels, convolutions){stacked}; "
      "routing_summary(params) shows where each leaf goes.", stacklevel=3)


def labels_fn(weight_dimension_numbers: Any, param_labels: Any,
              layer_axes: int) -> Callable[[Any], Any]:
  """The function from bare parameters to their labels."""
  if param_labels is not None:
    if weight_dimension_numbers is not None:
      raise TypeError(
          "Pass param_labels or weight_dimension_numbers, not both: a None "
          "entry of weight_dimension_numbers already sends its leaf to AdamW.")
    return param_labels if callable(param_labels) else (lambda _: param_labels)
  if weight_dimension_numbers is not None:
    def from_dimension_numbers(params):
      return jax.tree.unflatten(jax.tree.structure(params), [
          ADAM if d is None else LOW_RANK for d in tree_views.dimension_numbers(
              params, weight_dimension_numbers, layer_axes)])
    return from_dimension_numbers
  return lambda params: default_param_labels(params, layer_axes)


def partition_by_params(transforms: dict, labels_of_params: Callable, *,
                        num_replicas: int | None,
                        warn_at_init: Callable | None
                        ) -> optax.GradientTransformationExtraArgs:
  """``optax.partition`` whose labels are read from the parameters.

  ``optax.partition`` labels the gradients in ``update``; then a gradient
  leaf of the wrong rank would be routed elsewhere than init routed its
  parameter and fail in the other group, far from its cause. With
  compressed data parallelism (``num_replicas`` set) the gradients carry a
  leading replica axis, so labels can only come from ``params``. Every
  gradient's shape is checked against its parameter's, whichever group it
  goes to: AdamW would broadcast a (1,)-shaped gradient onto a bias.
  ``warn_at_init(params, labels)`` runs once, in ``init``.
  """
  # Labels read off bare arrays are a prefix of the tree whether or not its
  # leaves are in nnx Variable boxes (nnx.Optimizer boxes them for init, not
  # for update), so init and update mask the same subtrees.
  def labels_of(tree):
    labels = labels_of_params(nnx_interop.unboxed(tree))
    # Labels may be a prefix of the tree: each applies to its subtree.
    tree_views.prefix_map(lambda *_: None, labels, nnx_interop.unboxed(tree),
                          "param_labels", None)
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
      if label not in transforms:
        raise ValueError(
            f"{jax.tree_util.keystr(path)}: param_labels gives it the label "
            f"{label!r}; the labels are {tuple(transforms)}.")
    return labels

  def init_fn(params):
    labels = labels_of(params)
    if warn_at_init is not None:
      warn_at_init(nnx_interop.unboxed(params), labels)
    return optax.partition(transforms, labels).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None and num_replicas is not None:
      raise ValueError("With data_axis set, update needs params: the routing "
                       "labels are read from the parameters' shapes.")
    if params is not None:
      tree_views.check_gradient_shapes(
          nnx_interop.unboxed(updates), None, nnx_interop.unboxed(params),
          num_replicas)
    labels = labels_of(updates if params is None else params)
    return optax.partition(transforms, labels).update(
        updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class LeafRoute(NamedTuple):
  """Where one parameter goes, and the shape of its low-rank state."""
  path: str
  shape: tuple[int, ...]
  route: str                        # "low_rank" or "adam"
  matrices: int | None              # how many matrices (batch size)
  fan_in: int | None
  fan_out: int | None
  rank: int | None
  scale: float | None               # s in X <- X - lr s P Q^T
  right_factor_shape: tuple[int, ...] | None


class RoutingSummary(tuple):
  """A tuple of ``LeafRoute``; ``str()`` (and ``print``) give a table."""

  def __str__(self) -> str:
    rows = [("path", "shape", "route", "matrices", "fan_in x fan_out",
             "rank", "scale", "right factor")]
    for r in self:
      low = r.route == LOW_RANK
      rows.append((
          r.path, str(r.shape), r.route,
          str(r.matrices) if low else "", f"{r.fan_in} x {r.fan_out}"
          if low else "", str(r.rank) if low else "",
          f"{r.scale:.3g}" if low else "",
          str(r.right_factor_shape) if low else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)
                               ).rstrip() for row in rows)


def summarize(params: Any, labels: Any, view_of: Callable,
              weight_dimension_numbers: Any, layer_axes: int
              ) -> RoutingSummary:
  """Each leaf's route; ``view_of(path, shape, dims)`` gives its matrices."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  dims = tree_views.dimension_numbers(params, weight_dimension_numbers,
                                      layer_axes)
  routes = []
  for (path, x), label, d in zip(flat, jax.tree.leaves(labels), dims):
    path, shape = jax.tree_util.keystr(path), tuple(jnp.shape(x))
    if label != LOW_RANK:
      routes.append(LeafRoute(path, shape, label, *(None,) * 6))
      continue
    if d is None:
      raise ValueError(f"{path}: it is labelled {LOW_RANK!r}, but a leaf of "
                       f"shape {shape} has no default dimension numbers.")
    v = view_of(path, shape, d)
    routes.append(LeafRoute(
        path, shape, label, math.prod(v.batch_shape),
        v.fan_in, v.fan_out, v.rank, v.scale, v.right_factor_shape))
  return RoutingSummary(routes)
