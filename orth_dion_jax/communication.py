"""Bytes each collective of a compiled step moves, and across which axes.

``collective_ops(compiled, mesh)`` reads the optimized HLO of a jitted step
(``jax.jit(step).lower(...).compile()``) and returns one ``CollectiveOp`` per
array each all-reduce, all-gather, reduce-scatter, all-to-all or
collective-permute carries. It is the ground truth of what XLA will run: the
collectives the partitioner inserted as well as those written by hand in a
``shard_map``, after XLA combined, split or re-typed them.

Byte convention: ``bytes`` is the *payload* one device holds for the op, the
size of the full buffer being reduced, gathered or exchanged, not the traffic
of a particular algorithm. With a group of ``g`` devices:

* all-reduce: the operand. A ring moves ``2 (g - 1) / g`` times this per device.
* all-gather: the gathered output; reduce-scatter: the input (the output times
  ``g``). A ring moves ``(g - 1) / g`` times this per device.
* all-to-all: the operand; ``(g - 1) / g`` of it leaves the device.
* collective-permute: the operand, sent once to one peer.

A group of one device moves nothing: such a collective (XLA keeps, e.g., the
``psum`` over a mesh axis of size 1) is reported with ``bytes == 0`` and no
axes. A collective in a loop body is counted once, as written in the program,
not once per iteration. Async pairs (``all-reduce-start`` / ``-done``) are one
collective, named after the start.

The device ids in the HLO replica groups are logical ids, positions in
``mesh.devices.flat`` of the mesh the step's ``NamedSharding``s and
``shard_map``s use; they are mapped to mesh coordinates, and a collective is
attributed to the mesh axes along which the devices of a group differ.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import numpy as np

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
          "collective-permute")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+"
    rf"(?P<kind>{'|'.join(_KINDS)})(?P<phase>-start|-done)?"
    r"\((?P<operands>[^)]*)\)(?P<attrs>.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(
    r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\]"
    r"(?:, device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,]+)\))? \{([^}]*)\}")
_IOTA = re.compile(r"\[([\d,]+)\](?:T\(([\d,]+)\))?")


class CollectiveOp(NamedTuple):
  """One array moved by one collective instruction of a compiled program."""
  kind: str                 # "all-reduce", "all-gather", "reduce-scatter",
                            # "all-to-all" or "collective-permute"
  shape: tuple[int, ...]    # payload: see the module docstring
  dtype: str                # HLO element type: "f32", "bf16", ...
  bytes: int                # payload bytes per device; 0 for groups of one
  group_size: int           # devices per replica group
  axes: tuple[str, ...]     # mesh axes a group spans, in mesh order
  name: str                 # the HLO instruction (the start of an async pair)


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t]


def _iota(n: int, dims: str, perm: str | None) -> np.ndarray:
  """``iota(n)`` reshaped to ``dims`` and transposed by ``perm``."""
  array = np.arange(n).reshape(_ints(dims))
  return array.transpose(_ints(perm)) if perm else array


def _mesh_groups(mesh_axes: str, device_ids: str | None,
                 group_axes: str) -> np.ndarray:
  """Groups of ``mesh[...] {axes}``: devices differing only along ``axes``."""
  names, sizes = zip(*[(name, int(size)) for name, size in
                       re.findall(r"'?([\w.\-]+)'?=(\d+)", mesh_axes)])
  n = math.prod(sizes)
  ids = np.arange(n)
  if device_ids and (iota := _IOTA.fullmatch(device_ids)):
    ids = _iota(n, iota[1], iota[2]).ravel()
  elif device_ids:
    ids = np.array(_ints(device_ids))
  # "a:(pre)size" is the factor of size ``size`` of axis a whose more major
  # factors multiply to ``pre`` (Shardy's sub-axis); a bare "a" is a:(1)|a|.
  parts = {i: [] for i in range(len(names))}
  for name, pre, size in re.findall(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?",
                                    group_axes):
    i = names.index(name)
    parts[i].append((int(pre), int(size)) if size else (1, sizes[i]))
  factors, grouped = [], []
  for i, axis_size in enumerate(sizes):
    covered = 1
    for pre, size in sorted(parts[i]):
      if pre > covered:
        factors.append(pre // covered)
        grouped.append(False)
      factors.append(size)
      grouped.append(True)
      covered = pre * size
    if covered < axis_size:
      factors.append(axis_size // covered)
      grouped.append(False)
  order = np.argsort(grouped, kind="stable")  # grouped factors minor-most
  group_size = math.prod(f for f, g in zip(factors, grouped) if g)
  return ids.reshape(factors).transpose(order).reshape(-1, group_size)


def _connected(pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
  """Devices linked by source -> target pairs, as connected components."""
  root = {}

  def find(i):
    while root.setdefault(i, i) != i:
      i = root[i]
    return i

  for source, target in pairs:
    root[find(source)] = find(target)
  components = {}
  for i in root:
    components.setdefault(find(i), []).append(i)
  return list(components.values())


def device_groups(attributes: str,
                  num_devices: int) -> list[tuple[int, ...]]:
  """The device groups of one collective, from its HLO attributes.

  Reads ``replica_groups`` as an explicit list (``{{0,1},{2,3}}``; ``{}`` is
  one group of all devices), an iota list (``[2,4]<=[8]``,
  ``[4,2]<=[2,4]T(1,0)``: ``iota(N)`` reshaped, transposed, then cut into
  rows) or mesh axes (``mesh['a'=2,'b'=4] {'b'}``), and a permute's
  ``source_target_pairs`` as the groups of devices they connect.

  Args:
    attributes: the text after the instruction's operands.
    num_devices: devices the program runs on (for ``{}``).

  Returns:
    The groups, each sorted, in sorted order (a canonical form).
  """
  if match := _PAIRS.search(attributes):
    pairs = re.findall(r"\{(\d+),(\d+)\}", match[1])
    groups = _connected((int(s), int(t)) for s, t in pairs)
  elif match := _MESH_GROUPS.search(attributes):
    groups = _mesh_groups(match[1], match[2], match[3])
  elif match := _IOTA_GROUPS.search(attributes):
    n = int(match[1]) * int(match[2])
    groups = _iota(n, match[3], match[4]).reshape(int(match[1]), -1)
  elif match := _LIST_GROUPS.search(attributes):
    groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", match[1])]
    groups = groups or [range(num_devices)]
  else:
    raise ValueError(f"No device groups in {attributes[:200]!r}.")
  return sorted(tuple(sorted(int(i) for i in g)) for g in groups)


def _bits(dtype: str) -> int:
  return 8 if dtype == "pred" else int(re.search(r"\d+", dtype)[0])


def _records(kind: str, name: str, result_type: str, attributes: str,
             mesh: jax.sharding.Mesh) -> list[CollectiveOp]:
  groups = device_groups(attributes, mesh.devices.size)
  if max(max(g) for g in groups) >= mesh.devices.size:
    raise ValueError(f"{name} uses device ids beyond the mesh's "
                     f"{mesh.devices.size} devices: compiled for another mesh?")
  spans = np.zeros(mesh.devices.ndim, bool)
  for group in groups:
    coords = np.array(np.unravel_index(group, mesh.devices.shape))
    spans |= (coords != coords[:, :1]).any(axis=1)
  axes = tuple(a for a, s in zip(mesh.axis_names, spans) if s)
  group_size = max(len(g) for g in groups)
  records = []
  for dtype, dims in _ARRAY.findall(result_type):
    shape = _ints(dims)
    if kind == "reduce-scatter":  # the input: g times the scattered output
      shape[int(re.search(r"\bdimensions=\{(\d+)\}", attributes)[1])] *= (
          group_size)
    size = math.ceil(math.prod(shape) * _bits(dtype) / 8) if axes else 0
    records.append(CollectiveOp(kind, tuple(shape), dtype, size, group_size,
                              axes, name))
  return records


def collective_ops(compiled: Any, mesh: jax.sharding.Mesh) -> list[CollectiveOp]:
  """Every collective of a compiled program, one record per array it moves.

  A collective over a tuple of arrays (``psum`` of a pytree, XLA's
  combined all-reduces, CPU's all-to-all) gives one record per array, all
  with the instruction's name.

  Args:
    compiled: ``jax.jit(f).lower(...).compile()``, or its ``as_text()``.
    mesh: the mesh the program is sharded over.

  Returns:
    The records in program order.

  Example (with 8 devices, e.g.
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on CPU)::

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("x")))
    >>> compiled = jax.jit(lambda x: x.sum(axis=0)).lower(x).compile()
    >>> [(op.kind, op.bytes, op.axes) for op in collective_ops(compiled, mesh)]
    [('all-reduce', 16, ('x',))]
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  records, started = [], {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    name, attributes = match["name"], match["attrs"]
    if match["phase"] == "-start":  # the groups are on the start, the
      started[name] = attributes    # result shape on the done
      continue
    if match["phase"] == "-done":
      name = next(t for t in re.findall(r"[\w.\-]+", match["operands"])
                  if t in started)
      attributes = started.pop(name)
    records += _records(match["kind"], name, match["type"], attributes, mesh)
  return records


def bytes_by_axes(records: Sequence[CollectiveOp]) -> dict[tuple[str, ...], int]:
  """Total payload bytes per set of spanned mesh axes (moving ones only)."""
  totals = {}
  for r in records:
    if r.bytes:
      totals[r.axes] = totals.get(r.axes, 0) + r.bytes
  return totals


def bytes_crossing(records: Sequence[CollectiveOp], axis: str) -> int:
  """Payload bytes of the collectives whose groups span ``axis``."""
  return sum(r.bytes for r in records if axis in r.axes)


def summary_table(records: Sequence[CollectiveOp]) -> str:
  """One line per record, then the totals of ``bytes_by_axes``."""
  rows = [("collective", "payload", "bytes", "group", "axes", "name")]
  rows += [(r.kind, f"{r.dtype}[{','.join(map(str, r.shape))}]",
            f"{r.bytes:,}", str(r.group_size), ",".join(r.axes) or "-", r.name)
           for r in records]
  rows += [("total", "", f"{b:,}", "", ",".join(axes), "")
           for axes, b in bytes_by_axes(records).items()]
  widths = [max(len(row[c]) for row in rows) for c in range(5)]
  return "\n".join(
      "  ".join([cell.rjust(w) if c in (2, 3) else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(row, widths))] + [row[5]])
      .rstrip() for row in rows)
