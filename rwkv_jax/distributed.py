"""Several devices and several hosts: the cluster, the mesh, and how weights and batches lie on it.

One process runs on each host (RWKV-PEFT's node) and drives that host's first --devices
accelerators. `join` connects the processes through jax.distributed; `make_mesh` lines every
process's devices up along one axis, DATA, process 0's first, so that process p holds the p-th
slice of every global batch (`process_rows`, `global_batch`). Gradients are summed over the
mesh by XLA, as on one host; nothing here moves data by hand.

Weights are replicated on every device, or with --shard_weights split along one axis over the
mesh (`weight_shardings`) and gathered back one layer at a time inside the step (`Gather`):
a layer's weights exist whole only while that layer runs, forward and again in its recomputed
backward (FSDP's layout, for weights that are never updated). The embedding stays on the host
(train.host_embedding) either way.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rwkv_jax.errors import UserError

DATA = 'data'  # the mesh's one axis: the batch is split along it, and sharded weights too
# Leaves smaller than this stay replicated: the norms and per-channel vectors are a fraction of a
# percent of a model, and every sharded leaf costs a collective per layer and pass.
MIN_SHARDED_SIZE = 1 << 16


# ---------------------------------------------------------------------------------------------
# The cluster


def cluster_flags(num_nodes: int, coordinator: str | None, node_rank: int | None) -> tuple[str | None, int]:
  """(coordinator host:port, this host's rank), from the flags or else the environment: JAX's
  JAX_COORDINATOR_ADDRESS, or what torch/Lightning clusters (RWKV-PEFT's) set, MASTER_ADDR +
  MASTER_PORT and NODE_RANK. Refuses in one line what cannot form a cluster of `num_nodes` hosts."""
  if coordinator is None and os.environ.get('MASTER_ADDR') and os.environ.get('MASTER_PORT'):
    coordinator = f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]}'
  coordinator = coordinator or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if node_rank is None and os.environ.get('NODE_RANK', '').isdigit():
    node_rank = int(os.environ['NODE_RANK'])
  if num_nodes == 1:
    if node_rank not in (None, 0):
      raise UserError(f'--node_rank {node_rank} must be below --num_nodes 1; give --num_nodes (the number of hosts)')
    return None, 0
  if coordinator is None or node_rank is None:
    raise UserError(f'--num_nodes {num_nodes} needs --coordinator HOST:PORT (an address of the node_rank 0 host) and '
                    '--node_rank on every host (or MASTER_ADDR, MASTER_PORT and NODE_RANK in the environment)')
  host, _, port = coordinator.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'--coordinator {coordinator}: expected HOST:PORT, e.g. 10.0.0.1:5555')
  if not 0 <= node_rank < num_nodes:
    raise UserError(f'--node_rank {node_rank} must be 0 .. {num_nodes - 1} (--num_nodes {num_nodes})')
  return coordinator, node_rank


def join(num_nodes: int, coordinator: str | None, node_rank: int) -> None:
  """Connects this process to the others of a `num_nodes`-host run (nothing to do for one host).
  Must come before JAX touches a device; waits up to 5 minutes for every host to arrive."""
  if num_nodes == 1:
    return
  try:
    jax.distributed.initialize(coordinator, num_nodes, node_rank)
  except Exception as e:  # pylint: disable=broad-exception-caught  (XLA raises its own types)
    raise UserError(f'could not join the {num_nodes}-host run through {coordinator} as node {node_rank}: '
                    f'{str(e).splitlines()[0][:200]}; start every host with the same --num_nodes and '
                    '--coordinator, each with its own --node_rank') from e


def is_main() -> bool:
  """Whether this is process 0, the one that writes the run's files and prints its progress."""
  return jax.process_index() == 0


def from_main(compute, like):
  """compute() run on process 0 alone (it reads the run's files), its result on every process.

  like: a pytree of the result's structure and shapes, the other processes' placeholder. A
  UserError raised on process 0 ends every process (the others with a line pointing to it).
  """
  if jax.process_count() == 1:
    return compute()
  value, error = like, None
  if is_main():
    try:
      value = compute()
    except UserError as e:
      error = e
  if multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
    raise error or UserError('node 0 stopped with an error (see its output)')
  return multihost_utils.broadcast_one_to_all(value)


# ---------------------------------------------------------------------------------------------
# The mesh and the batch


def make_mesh(devices_per_node: int) -> Mesh:
  """The first `devices_per_node` devices of every process on one axis, process by process."""
  chosen = [d for p in range(jax.process_count())
            for d in sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)[:devices_per_node]]
  return Mesh(np.array(chosen), (DATA,))


def process_rows(x_AxBxT):
  """This process's share of a global batch: its slice of the batch axis (axis 1)."""
  B = x_AxBxT.shape[1] // jax.process_count()
  return x_AxBxT[:, jax.process_index() * B:(jax.process_index() + 1) * B]


def global_batch(local_tree, mesh: Mesh):
  """Every process's `process_rows` -> one global array per leaf, split over the mesh along axis 1."""
  sharding = NamedSharding(mesh, PartitionSpec(None, DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_tree)


# ---------------------------------------------------------------------------------------------
# Weights


def _weight_spec(name: str, shape: tuple[int, ...], n_devices: int) -> PartitionSpec:
  """Split along the largest axis `n_devices` divides; small leaves stay whole."""
  if int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return PartitionSpec()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n_devices == 0:
      return PartitionSpec(*(DATA if a == axis else None for a in range(len(shape))))
  raise UserError(f'--shard_weights over {n_devices} devices: {name} {list(shape)} has no dimension {n_devices} '
                  'divides; use a device count that divides the model\'s widths (2, 4 or 8 for every released model)')


def weight_shardings(weights, mesh: Mesh, shard: bool):
  """A NamedSharding for every leaf of `weights`: replicated, or (shard) split over the mesh."""
  if not shard:
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), weights)
  spec = lambda path, w: _weight_spec(jax.tree_util.keystr(path, simple=True, separator='.'), w.shape, mesh.size)
  return jax.tree_util.tree_map_with_path(lambda path, w: NamedSharding(mesh, spec(path, w)), weights)


class Gather:
  """Weights split over the mesh (weight_shardings), made whole where they are used.

  gather(weights, dep) -> the weights whole on every device, once `dep` (an array whose batch,
  axis 0, is split over the mesh) exists. run_block: one block run with its weights gathered
  for the forward pass, and gathered again for the backward pass, which recomputes the block
  (as remat does) once the gradient of its output has arrived: the weights of one layer are
  whole at a time, in each direction.
  """

  def __init__(self, mesh: Mesh):
    self.mesh = mesh

  def __call__(self, weights, dep):
    return jax.tree.map(lambda w: _gather_leaf(w, dep, self.mesh), weights)

  def run_block(self, apply, states, weights, x_BxTxC, layer_state, carry, doc_starts_BxM):
    """apply(states, whole weights, x, layer_state, carry, doc_starts) -> (x, layer_state, carry),
    see RWKV.hidden_states; no gradient is formed for the weights (nor the document-start flags)."""

    @jax.custom_vjp
    def run(states, weights, x_BxTxC, layer_state, carry, doc_starts_BxM):
      return apply(states, self(weights, x_BxTxC), x_BxTxC, layer_state, carry, doc_starts_BxM)

    def run_fwd(*args):
      return run(*args), args

    def run_bwd(args, cotangent):
      states, weights, x_BxTxC, layer_state, carry, doc_starts_BxM = args
      whole = self(weights, cotangent[0])  # the gradient of the block's output x
      _, vjp = jax.vjp(lambda s, x, ls, c: apply(s, whole, x, ls, c, doc_starts_BxM), states, x_BxTxC, layer_state,
                       carry)
      d_states, dx_BxTxC, d_layer_state, d_carry = vjp(cotangent)
      return (d_states, jax.tree.map(_no_gradient, weights), dx_BxTxC, d_layer_state, d_carry,
              jax.tree.map(_no_gradient, doc_starts_BxM))

    run.defvjp(run_fwd, run_bwd)
    return run(states, weights, x_BxTxC, layer_state, carry, doc_starts_BxM)


def _no_gradient(w):
  """The zero cotangent of a frozen weight (float0 for the integer leaves of a quantized one)."""
  return jnp.zeros_like(w) if jnp.issubdtype(w.dtype, jnp.inexact) else np.zeros(w.shape, jax.dtypes.float0)


def _gather_leaf(w, dep, mesh: Mesh):
  """One weight's all-gather, made to wait for `dep`.

  XLA may run a collective as soon as its operand exists: every layer's gather of a stored
  weight could run at the start of the step and hold the whole model at once (XLA's CPU
  pipeline drops optimization barriers before it schedules, so a barrier does not prevent it).
  Adding isnan of the device's first element of `dep`, 0 when it is finite, makes the gather
  wait for `dep` on every backend; a NaN there makes a NaN loss, which the step discards anyway.
  """
  spec = _weight_spec('', w.shape, mesh.size)
  if DATA not in spec:
    return w
  axis = spec.index(DATA)

  def gather_local(w_local, dep_local):
    w_local = w_local + jnp.isnan(dep_local.reshape(-1)[0]).astype(w_local.dtype)
    return jax.lax.all_gather(w_local, DATA, axis=axis, tiled=True)

  # check_vma=False: JAX does not infer that an all_gather's result is the same on every device.
  return jax.shard_map(gather_local, mesh=mesh, in_specs=(spec, PartitionSpec(DATA)), out_specs=PartitionSpec(),
                       check_vma=False)(w, dep)
