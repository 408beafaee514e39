"""Flax NNX ``Variable`` boxes in and out of the transformations.

``nnx.Optimizer`` hands ``init`` a state of ``Variable``s and copies each
box's metadata (its sharding included) onto every state leaf built from it.
The right factor and the per-matrix scalars are not shaped like their
parameter, so the transformations work on the bare arrays and place their
state themselves; updates computed from boxed gradients are returned in the
same boxes, as optax's own transformations do.

Flax is optional: no ``Variable`` can exist unless ``flax.nnx`` was imported,
so nothing here imports it.
"""

from __future__ import annotations

import sys
from typing import Any

import jax


def _is_box(x: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def unboxed(tree: Any) -> Any:
  """``tree`` with every NNX ``Variable`` replaced by its array."""
  if "flax.nnx" not in sys.modules:
    return tree
  return jax.tree.map(lambda x: x.get_value() if _is_box(x) else x, tree,
                      is_leaf=_is_box)


def has_boxes(tree: Any) -> bool:
  if "flax.nnx" not in sys.modules:
    return False
  return any(map(_is_box, jax.tree.leaves(tree, is_leaf=_is_box)))


def boxed_like(boxed: Any, bare: Any) -> Any:
  """``bare``'s arrays in the ``Variable`` boxes of ``boxed``.

  A Variable is a pytree node whose one child is its array, so both trees
  list the same leaves in the same order; ``optax.apply_updates`` and
  ``nnx.update`` expect updates boxed like the parameters.
  """
  return jax.tree.unflatten(jax.tree.structure(boxed), jax.tree.leaves(bare))
