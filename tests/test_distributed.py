"""Several devices and hosts: weights split over the devices (--shard_weights) train the same
state as replicated ones and hold a share of the memory; two processes joined through
jax.distributed train the same state as one process taking the same global batch.

The main test process has JAX on one CPU device already: whatever needs several runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count.
"""
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import train_state
from rwkv_jax import cli, distributed, state_io, synthetic
from rwkv_jax.errors import UserError
from tests.conftest import assert_one_line_error

DEVICES = 4
# Models of width 256: their projections (256 x 256 and up) are large enough to be split
# (distributed.MIN_SHARDED_SIZE); the tiny model's would all stay whole.
SPLIT = dict(n_embd=256, dim_ffn=896)

# Runs in a subprocess with DEVICES CPU devices; prints one JSON line.
SHARDED_STEP = '''
import dataclasses, json, sys
import jax, numpy as np
from rwkv_jax import distributed, quant, synthetic, train
from tests.conftest import random_model

n_layer, steps = int(sys.argv[1]), int(sys.argv[2])
cfg = dataclasses.replace(synthetic.TINY, n_layer=n_layer, n_embd=256, dim_ffn=896, vocab_size=1024)  # see SPLIT
mesh = distributed.make_mesh(jax.device_count())
tokens = np.random.default_rng().integers(0, cfg.vocab_size, (1, 2 * mesh.size, 33)).astype(np.int32)
opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 2, 20))
out = {}
for shard in (False, True):
  model = random_model(cfg, seed=1)
  embedding = train.host_embedding(model)
  graphdef, states, weights = train.split(model)
  shardings = distributed.weight_shardings(weights, mesh, shard)
  weights = jax.device_put(weights, shardings)
  step = train.make_train_step(graphdef, opt, gather=distributed.Gather(mesh) if shard else None)
  whole = distributed.NamedSharding(mesh, distributed.PartitionSpec())
  state = jax.device_put(train.init_train_state(states, opt), whole)
  batch = distributed.global_batch((quant.take_rows(embedding, tokens[..., :-1]), tokens[..., 1:]), mesh)
  compiled = step.lower(state, weights, *batch).compile()
  memory = compiled.memory_analysis()
  for _ in range(steps):
    state, _ = compiled(state, weights, *batch)
  split_bytes = sum(w.nbytes for w, s in zip(jax.tree.leaves(weights), jax.tree.leaves(shardings)) if s.spec)
  out['sharded' if shard else 'replicated'] = {
      'wkv': train.wkv_array(state.states).tolist(), 'arguments': memory.argument_size_in_bytes,
      'temp': memory.temp_size_in_bytes, 'split_bytes': split_bytes,
      'layer_bytes': sum(w.nbytes for w in jax.tree.leaves(weights['blocks'][0])),
      'head_bytes': sum(w.nbytes for w in jax.tree.leaves(weights['head']))}
print('RESULT ' + json.dumps(out))
'''


@functools.cache
def sharded_and_replicated() -> dict:
  """Both tests below read the same run: 3 layers (the memory test tells one layer from all), 2 steps."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={DEVICES}'}
  result = subprocess.run([sys.executable, '-c', SHARDED_STEP, '3', '2'],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.split('RESULT ')[-1])


rms = lambda x: np.sqrt(np.mean(np.square(x)))


def test_sharded_weights_train_the_state_of_replicated_weights():
  """fp32; quantized weights are split in test_two_processes_train_the_state_of_one."""
  out = sharded_and_replicated()
  replicated, sharded = (np.array(out[k]['wkv']) for k in ('replicated', 'sharded'))
  assert out['sharded']['split_bytes'] > 0
  assert rms(replicated) > 0.01
  # The same products on the same devices; only XLA's fusion around the gathers may round differently.
  assert rms(sharded - replicated) / rms(replicated) <= 1e-5, rms(sharded - replicated) / rms(replicated)


def test_sharded_weights_hold_a_share_of_the_model_and_one_layer_whole():
  """Per device (the compiled step's memory analysis): the split weights take 1/DEVICES of their
  bytes, and the gathered weights alive at once are at most one layer's and the head's."""
  out = sharded_and_replicated()
  replicated, sharded = out['replicated'], out['sharded']
  saved = sharded['split_bytes'] * (1 - 1 / DEVICES)
  assert abs(replicated['arguments'] - saved - sharded['arguments']) <= 0.01 * sharded['arguments'], out
  # Three layers gathered at once would exceed this by two layers.
  assert sharded['temp'] <= replicated['temp'] + sharded['layer_bytes'] + sharded['head_bytes'], (
      sharded['temp'], replicated['temp'], sharded['layer_bytes'])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_the_state_of_one(write_checkpoint, tmp_path):
  """Two hosts' worth of processes (2 devices each, int8 weights split over all 4) through
  jax.distributed on CPU, against one process on one device taking the same global batch of 4."""
  lines = [json.dumps({'text': f'User: what is {a} plus {b}?\n\nAssistant: {a + b}.'})
           for a, b in np.random.default_rng().integers(0, 50, (32, 2))]
  data = tmp_path / 'train.jsonl'
  data.write_text('\n'.join(lines) + '\n')
  model = write_checkpoint(dataclasses.replace(synthetic.TINY, **SPLIT), seed=6)
  common = ['train_state.py', '--ckpt', model, '--data', data, '--ctx_len', 24, '--epoch_count', 1,
            '--random_seed', 3, '--precision', 'fp32', '--warmup_steps', 2, '--quant', 'int8']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'}
  cluster = ['--num_nodes', 2, '--coordinator', f'localhost:{free_port()}', '--devices', 2, '--micro_bsz', 1,
             '--epoch_steps', 16, '--shard_weights', '--proj_dir', tmp_path / 'cluster']
  nodes = [subprocess.Popen([sys.executable, *map(str, common + cluster + ['--node_rank', rank])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
  try:
    # --shard_weights on one device: the sharded path on a 1-device mesh, the weights whole.
    one = subprocess.run([sys.executable, *map(str, common + ['--devices', 1, '--micro_bsz', 4, '--epoch_steps', 4,
                                                              '--shard_weights', '--proj_dir', tmp_path / 'one'])],
                         capture_output=True, text=True, env=env)
    outputs = [node.communicate(timeout=240) for node in nodes]
  finally:
    for node in nodes:  # a node left waiting for the other (a failure, the timeout) must not outlive the test
      node.kill()
  for node, (stdout, stderr) in zip(nodes, outputs):
    assert node.returncode == 0, stderr
  assert one.returncode == 0, one.stderr
  assert 'steps of' not in outputs[1][0] and 'steps of 4 x 24 tokens' in outputs[0][0]  # process 0 speaks for the run
  logs = {name: [json.loads(line) for line in (tmp_path / name / 'loss_data.jsonl').read_text().splitlines()]
          for name in ('cluster', 'one')}
  assert [entry['step'] for entry in logs['cluster']] == [1, 2, 3, 4]
  two_hosts, one_host = (state_io.read_state(tmp_path / name / 'checkpoint') for name in ('cluster', 'one'))
  assert rms(one_host) > 0.1
  # The gradient is summed over 4 devices in another order than one device sums its batch: fp32
  # rounding. The step losses show it: over 16 fresh draws of the data they differed by at most
  # 4.8e-6 relative, where a token lost or counted twice would move them by ~1e-2.
  np.testing.assert_allclose([e['loss'] for e in logs['cluster']], [e['loss'] for e in logs['one']], rtol=1e-4)
  # The states amplify it: Adam moves an entry by about a full step whatever the size of its
  # gradient, so an entry whose gradient is at rounding level can step either way, and the later
  # gradients follow it a little. Over the same 16 draws the relative RMS was 4.8e-6 to 4.6e-4
  # (3 of them above 1e-4); a host on the wrong share of the batch, or without the others'
  # gradients, moves it by order 1.
  assert rms(two_hosts - one_host) / rms(one_host) < 1e-2, rms(two_hosts - one_host) / rms(one_host)


def test_bad_cluster_flags_end_in_one_line(write_checkpoint, tmp_path, capsys, monkeypatch):
  for name in ('MASTER_ADDR', 'MASTER_PORT', 'NODE_RANK', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  base = ['--ckpt', write_checkpoint(), '--data', tmp_path / 'd.jsonl', '--proj_dir', tmp_path / 'o']
  cases = [
      (['--num_nodes', 2], '--num_nodes 2 needs --coordinator HOST:PORT'),
      (['--num_nodes', 2, '--coordinator', 'h:1', '--node_rank', 2], '--node_rank 2 must be 0 .. 1'),
      (['--num_nodes', 2, '--coordinator', 'nowhere', '--node_rank', 0], '--coordinator nowhere: expected HOST:PORT'),
      (['--node_rank', 1], '--node_rank 1 must be below --num_nodes 1'),
      (['--num_nodes', 0], '--num_nodes 0: must be at least 1'),
      (['--num_nodes', 2, '--devices', 2, '--epoch_steps', 3], 'less than one optimizer step'),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      cli.run(train_state.main, [str(a) for a in base + args])
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, message)


def test_weights_split_along_their_largest_divisible_axis_or_are_refused():
  spec = distributed._weight_spec  # pylint: disable=protected-access
  assert spec('w', (256, 448), 4) == distributed.PartitionSpec(None, 'data')
  assert spec('w', (448, 256), 4) == distributed.PartitionSpec('data', None)
  assert spec('w', (7, 256, 300), 7) == distributed.PartitionSpec('data', None, None)
  assert spec('small', (3, 5), 4) == distributed.PartitionSpec()  # under MIN_SHARDED_SIZE: whole
  with pytest.raises(UserError, match=r'--shard_weights over 3 devices: blocks.0.w \[256, 448\]'):
    spec('blocks.0.w', (256, 448), 3)
