"""The pod-scale communication table (``benchmarks.pod_communication``).

The table is read off steps compiled for a 1024-device mesh, scaled from one
layer to the whole model. What it relies on, checked on the quick model
(d = 256) over the 8 CPU devices:

* the bytes crossing "data" are the device's blocks of what is averaged
  (gradients, or ``P`` and ``R``), on two meshes of different splits;
* layers add: two layers compiled together move twice one layer's bytes,
  up to a few scalars;
* the time model is a ring at the slowest axis a group spans.
"""

import functools

import jax
import pytest

from benchmarks import pod_communication as pod
from orth_dion_jax import communication

MODEL = pod.QUICK_MODEL
SQUARE = (2, 2, 2)     # (data, fsdp, tensor)
TALL = (2, 4, 1)       # "tensor" splits nothing: factors replicated over it


@functools.lru_cache(maxsize=None)
def _measure(name, layout, rank_fraction, mesh_shape, copies=1):
  mesh = jax.make_mesh(mesh_shape, pod.AXES)
  return pod.measure(MODEL, name, layout, rank_fraction, mesh,
                     pod.BANDWIDTH_GB_S, copies=copies)


@pytest.mark.parametrize("mesh_shape", [SQUARE, TALL])
@pytest.mark.parametrize("name, layout, rank_fraction", [
    ("orth_dion", pod.PLAIN, 0.25), ("adamw", pod.PLAIN, None),
    ("orth_dion", pod.COMPRESSED, 0.25)])
def test_data_bytes_are_the_device_blocks(mesh_shape, name, layout,
                                          rank_fraction):
  r = _measure(name, layout, rank_fraction, mesh_shape)
  extra = r["crossing"]["data"] - r["data_ideal_bytes"]
  if layout == pod.PLAIN:
    assert extra == 0
  else:
    # 4-byte scalars, 24 bytes per matrix measured: the non-finite flags
    # and the diagnostic's sums, some over the whole mesh.
    assert 0 <= extra <= 7 * 8 * 4


def test_data_ideal_is_derived_by_hand_for_the_tall_mesh():
  # (2, 4, 1), rank 1/4: column-parallel rows split 4, row-parallel columns
  # split 4; P and R are the blocks of the big and small side times r.
  shapes = pod.stacked_layers(pod.layer_shapes(MODEL), 1)
  specs = pod.layer_specs(shapes)
  mesh_shape = dict(zip(pod.AXES, TALL))
  plain = 2 * 64 * 256 + 2 * 64 * 128 + 3 * 64 * 512 + 2 * 256
  compressed = (2 * 64 * (64 + 256) + 2 * 32 * (64 + 128)
                + 3 * 64 * (64 + 512) + 2 * 256)
  assert pod.data_ideal_bytes(shapes, specs, mesh_shape, pod.PLAIN,
                              None) == 4 * plain
  assert pod.data_ideal_bytes(shapes, specs, mesh_shape, pod.COMPRESSED,
                              0.25) == 4 * compressed


@pytest.mark.parametrize("mesh_shape, compressed_moves_less", [
    (SQUARE, True), (TALL, False)])
def test_compressed_moves_less_over_data_only_when_factor_blocks_are_smaller(
    mesh_shape, compressed_moves_less):
  # On (2, 2, 2) the factor blocks are smaller than the gradient blocks; on
  # (2, 4, 1) each P and R block is whole along the side "tensor" does not
  # split, and more than the device's gradient block.
  plain = _measure("orth_dion", pod.PLAIN, 0.25, mesh_shape)
  compressed = _measure("orth_dion", pod.COMPRESSED, 0.25, mesh_shape)
  assert (compressed["crossing"]["data"] < plain["crossing"]["data"]) == (
      compressed_moves_less)


@pytest.mark.parametrize("layout", [pod.PLAIN, pod.COMPRESSED])
def test_orth_dion_and_dion_move_the_same_bytes_over_data(layout):
  orth = _measure("orth_dion", layout, 0.25, SQUARE)
  dion = _measure("dion", layout, 0.25, SQUARE)
  assert orth["crossing"]["data"] == dion["crossing"]["data"]
  # Orth-Dion's CholeskyQR of R sums an r x r Gram matrix over "fsdp".
  assert orth["crossing"]["fsdp"] > dion["crossing"]["fsdp"]


@pytest.mark.parametrize("name, layout, rank_fraction", [
    ("orth_dion", pod.COMPRESSED, 0.25), ("muon", pod.PLAIN, None)])
def test_two_layers_move_twice_one_layers_bytes(name, layout, rank_fraction):
  one = _measure(name, layout, rank_fraction, SQUARE)
  two = _measure(name, layout, rank_fraction, SQUARE, copies=2)
  # Up to a few 4-byte scalars the compiler shares between layers.
  for axis in pod.AXES:
    assert abs(two["crossing"][axis] - 2 * one["crossing"][axis]) <= 64
  assert two["seconds"] == pytest.approx(2 * one["seconds"], rel=1e-4)
  rows = pod.table_rows([one, two], layers=MODEL.layers)
  assert rows[0][:3] == rows[1][:3]     # rank, optimizer, layout
  assert rows[0][3:] == pytest.approx(rows[1][3:], rel=1e-4)


def test_time_is_a_ring_at_the_slowest_axis_spanned():
  op = lambda kind, axes: communication.CollectiveOp(
      kind, (250_000_000,), "f32", 10**9, 8, axes, "x")
  bandwidth = {"data": 25.0, "fsdp": 25.0, "tensor": 100.0}
  assert pod.link_seconds(op("all-reduce", ("tensor",)), bandwidth) == (
      pytest.approx(2 * 7 / 8 * 1e9 / 100e9))
  assert pod.link_seconds(op("all-gather", ("fsdp", "tensor")), bandwidth) == (
      pytest.approx(7 / 8 * 1e9 / 25e9))
  assert pod.link_seconds(op("collective-permute", ("data",)), bandwidth) == (
      pytest.approx(1e9 / 25e9))
