"""Communication accounting read from compiled HLO (``communication``).

Each expectation is derived by hand from the program: the local block a
device holds, the collective the code asks for, and the mesh axes its device
groups span. A (2, 4) mesh ("data", "model") over the 8 CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from orth_dion_jax import communication as comm

MESH = jax.make_mesh((2, 4), ("data", "model"))
X = (32, 32)        # a global f32 array; its (data, model) block is (16, 8)


def _compile(f, mesh, in_specs, out_specs, *shapes):
  """Compiles ``shard_map(f)`` on f32 inputs of ``shapes`` split by in_specs."""
  args = [jax.ShapeDtypeStruct(s, jnp.float32,
                               sharding=NamedSharding(mesh, spec))
          for s, spec in zip(shapes, in_specs)]
  mapped = jax.shard_map(f, mesh=mesh, in_specs=tuple(in_specs),
                         out_specs=out_specs, check_vma=False)
  return jax.jit(mapped).lower(*args).compile()


def _records(f, in_specs, out_specs, *shapes, mesh=MESH):
  return comm.collective_ops(_compile(f, mesh, in_specs, out_specs, *shapes), mesh)


@pytest.mark.parametrize("axes, group_size", [
    (("model",), 4), (("data",), 2), (("data", "model"), 8)])
def test_psum_is_one_all_reduce_of_the_local_block(axes, group_size):
  (r,) = _records(lambda a: jax.lax.psum(a, axes), [P("data", "model")],
                  P(), X)
  assert (r.kind, r.shape, r.dtype) == ("all-reduce", (16, 8), "f32")
  assert (r.bytes, r.group_size, r.axes) == (16 * 8 * 4, group_size, axes)


def test_all_gather_counts_the_gathered_output():
  gather = lambda a: jax.lax.all_gather(a, "model", axis=1, tiled=True)
  (r,) = _records(gather, [P("data", "model")], P("data"), X)
  assert (r.kind, r.shape, r.bytes, r.axes) == (
      "all-gather", (16, 32), 16 * 32 * 4, ("model",))


def test_reduce_scatter_counts_its_input():
  scatter = lambda a: jax.lax.psum_scatter(a, "model", scatter_dimension=1,
                                           tiled=True)
  (r,) = _records(scatter, [P("data")], P("data", "model"), X)
  # The HLO result is the (16, 8) shard; the payload is the (16, 32) input.
  assert (r.kind, r.shape, r.bytes, r.axes) == (
      "reduce-scatter", (16, 32), 16 * 32 * 4, ("model",))


def test_ppermute_ring_spans_its_axis():
  ring = [(i, (i + 1) % 4) for i in range(4)]
  shift = lambda a: jax.lax.ppermute(a, "model", ring)
  (r,) = _records(shift, [P("data", "model")], P("data", "model"), X)
  assert (r.kind, r.shape, r.bytes, r.group_size, r.axes) == (
      "collective-permute", (16, 8), 512, 4, ("model",))


def test_tuple_psum_gives_one_record_per_array():
  both = lambda a, b: jax.lax.psum((a, b), "model")
  records = _records(both, [P("data", "model"), P("data")], (P(), P()),
                     X, (8,))
  assert [(r.kind, r.shape, r.bytes, r.axes) for r in records] == [
      ("all-reduce", (16, 8), 512, ("model",)),
      ("all-reduce", (4,), 16, ("model",))]
  assert records[0].name == records[1].name   # one instruction


def test_all_to_all_moves_the_local_block_within_its_axis():
  swap = lambda a: jax.lax.all_to_all(a, "model", 0, 1, tiled=True)
  records = _records(swap, [P("data", "model")], P("data", "model"), X)
  # XLA CPU splits the operand into one tuple element per peer, (4, 8) each;
  # what is physically exchanged is still the whole (16, 8) block.
  assert {r.kind for r in records} == {"all-to-all"}
  assert comm.bytes_by_axes(records) == {("model",): 16 * 8 * 4}


def test_partitioner_inserted_all_reduce():
  """A matmul contracting a dimension split over "model" sums over "model"."""
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  x = jax.ShapeDtypeStruct((16, 32), jnp.float32,
                           sharding=NamedSharding(mesh, P(None, "model")))
  w = jax.ShapeDtypeStruct((32, 8), jnp.float32,
                           sharding=NamedSharding(mesh, P("model")))
  compiled = jax.jit(jnp.matmul).lower(x, w).compile()
  records = comm.collective_ops(compiled, mesh)
  # The partial (16, 8) products are summed over the 4 "model" shards; XLA
  # prints these groups in the mesh-axes form ("mesh[...] {...}").
  assert [(r.kind, r.shape, r.axes) for r in records] == [
      ("all-reduce", (16, 8), ("model",))]
  assert comm.bytes_crossing(records, "model") == 16 * 8 * 4
  assert comm.bytes_crossing(records, "data") == 0


def test_ids_are_positions_in_the_mesh_not_device_ids():
  # Devices 0, 2, 4, 6 form the first "data" row: device ids and mesh
  # positions disagree, the attribution must follow the positions.
  devices = np.array(jax.devices())[[0, 2, 4, 6, 1, 3, 5, 7]].reshape(2, 4)
  mesh = Mesh(devices, ("data", "model"))
  for axes in ("data", "model"):
    (r,) = _records(lambda a: jax.lax.psum(a, axes), [P("data", "model")],
                    P(), X, mesh=mesh)
    assert r.axes == (axes,)


def test_a_group_of_one_device_moves_nothing():
  mesh = jax.make_mesh((1, 8), ("one", "x"))
  (r,) = _records(lambda a: jax.lax.psum(a, "one"), [P("x")], P("x"),
                  (8, 8), mesh=mesh)
  assert (r.kind, r.group_size, r.bytes, r.axes) == ("all-reduce", 1, 0, ())
  assert comm.bytes_by_axes([r]) == {}


def test_a_collective_in_a_loop_is_counted_once():
  loop = lambda a: jax.lax.fori_loop(
      0, 3, lambda _, c: jax.lax.psum(c, "model"), a)
  records = _records(loop, [P("data", "model")], P(), X)
  assert [(r.kind, r.bytes) for r in records] == [("all-reduce", 512)]


def test_totals_and_table():
  two_sums = lambda a: jax.lax.psum(jax.lax.psum(a, "model") * 2.0, "data")
  records = _records(two_sums, [P("data", "model")], P(), X)
  assert comm.bytes_by_axes(records) == {("model",): 512, ("data",): 512}
  assert comm.bytes_crossing(records, "model") == 512
  table = comm.summary_table(records)
  assert table.splitlines()[0].split() == [
      "collective", "payload", "bytes", "group", "axes", "name"]
  assert "f32[16,8]" in table and len(table.splitlines()) == 1 + 2 + 2


@pytest.mark.parametrize("iota, explicit", [
    ("replica_groups=[2,4]<=[8]", "replica_groups={{0,1,2,3},{4,5,6,7}}"),
    ("replica_groups=[4,2]<=[2,4]T(1,0)",
     "replica_groups={{0,4},{1,5},{2,6},{3,7}}"),
    ("replica_groups=[1,8]<=[8]", "replica_groups={}"),
    # Mesh-axes form, as XLA CPU prints partitioner-inserted collectives.
    ("replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], "
     "device_ids=([2,4]T(1,0)) {'axis_1'}",
     "replica_groups={{0,1,2,3},{4,5,6,7}}"),
    ("replica_groups=mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'b'}",
     "replica_groups={{0,2,4,6},{1,3,5,7}}"),
    ("replica_groups=mesh['a'=2,'b'=4], device_ids=(0,2,4,6,1,3,5,7) {'b'}",
     "replica_groups={{0,2,4,6},{1,3,5,7}}"),
    ("replica_groups=mesh['a'=2,'b'=4] {'a'}",
     "replica_groups={{0,4},{1,5},{2,6},{3,7}}"),
    # "a":(1)2 is the major factor 2 of a = 8: iota(8) as [1, 2, 4].
    ("replica_groups=mesh['a'=8] {'a':(1)2}",
     "replica_groups={{0,4},{1,5},{2,6},{3,7}}"),
    ("replica_groups=mesh['a'=8] {'a':(1)2,'a':(4)2}",
     "replica_groups={{0,1,4,5},{2,3,6,7}}"),
])
def test_group_forms_agree(iota, explicit):
  assert comm.device_groups(iota, 8) == comm.device_groups(explicit, 8)


def test_permute_pairs_group_into_connected_devices():
  pairs = "source_target_pairs={{0,1},{1,0},{4,5},{5,4},{2,2}}"
  assert comm.device_groups(pairs, 8) == [(0, 1), (2,), (4, 5)]


# One instruction per line, as XLA prints it; split here only for width.
ASYNC_HLO = "\n".join([
    "ENTRY %main (p: f32[16,8]) -> f32[16,8] {",
    "  %p = f32[16,8]{1,0} parameter(0)",
    "  %ar-start = f32[16,8]{1,0} all-reduce-start(%p), channel_id=1, "
    "replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add",
    "  %ar-done = f32[16,8]{1,0} all-reduce-done(%ar-start)",
    "  %ag-start = (f32[16,8]{1,0}, bf16[32,8]{1,0}) "
    "all-gather-start(%ar-done), channel_id=2, "
    "replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}",
    "  %ag-done = bf16[32,8]{1,0} all-gather-done(%ag-start)",
    "  %cp-start = (f32[16,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) "
    "collective-permute-start(%p), channel_id=3, "
    "source_target_pairs={{0,1},{1,2},{2,3},{3,0}}",
    "  ROOT %cp-done = f32[16,8]{1,0} collective-permute-done(%cp-start)",
    "}"])


def test_async_pairs_count_once_with_the_done_shape():
  records = comm.collective_ops(ASYNC_HLO, MESH)
  assert [(r.kind, r.shape, r.dtype, r.bytes, r.axes, r.name)
          for r in records] == [
      ("all-reduce", (16, 8), "f32", 512, ("model",), "ar-start"),
      ("all-gather", (32, 8), "bf16", 512, ("data",), "ag-start"),
      ("collective-permute", (16, 8), "f32", 512, ("model",), "cp-start")]
