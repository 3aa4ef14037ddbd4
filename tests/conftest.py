"""Shared fixtures: random checkpoints in the official layout, and the `rwkv` package as oracle."""
import os

# The oracle must take its pure-PyTorch path: no JIT, no CUDA kernels.
os.environ.setdefault('RWKV_JIT_ON', '0')
os.environ.setdefault('RWKV_CUDA_ON', '0')
# On a CPU most of the suite's time is XLA compiling small programs (interpret-mode kernels, tiny
# models), not running them: without LLVM's optimization passes the compiles take about half as
# long, and every comparison is between programs compiled alike. Not on a GPU machine, where
# `pytest -m gpu` must run the programs as training does. Inherited by the tests' subprocesses.
if not os.path.exists('/proc/driver/nvidia/version'):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
                             ' --xla_llvm_disable_expensive_passes=true').strip()

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from rwkv_jax import checkpoint, synthetic  # pylint: disable=g-import-not-at-top
from rwkv_jax.models import RWKV  # pylint: disable=g-import-not-at-top


def random_model(cfg=synthetic.TINY, seed=0, dtype=np.float32, implementation=None) -> RWKV:
  """An RWKV model with random weights in the official layout, built without a file."""
  tensors = synthetic.random_checkpoint(cfg, seed=seed, dtype=dtype)
  return RWKV(cfg, checkpoint.params_from_tensors(tensors, cfg), implementation)


@pytest.fixture
def write_checkpoint(tmp_path):
  """Writes a random x060 checkpoint and returns its path."""
  def write(cfg=synthetic.TINY, dtype=np.float32, seed=None, with_time_state=False, name='model.pth'):
    seed = np.random.SeedSequence().entropy if seed is None else seed
    tensors = synthetic.random_checkpoint(cfg, seed=seed, dtype=dtype, with_time_state=with_time_state)
    path = tmp_path / name
    checkpoint.write_pth(path, tensors)
    return path
  return write


def rwkv_package_model(path):
  """The official `rwkv` pip package on CPU in fp32 (the reference implementation)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from rwkv.model import RWKV  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):  # It prints a table of every tensor.
    return RWKV(model=str(path), strategy='cpu fp32')


def assert_one_line_error(returncode, stderr, *fragments):
  """A user error: exit 2, no traceback, one `error: ...` line, the last on stderr (progress bars
  may come before it), naming every fragment."""
  assert returncode == 2, stderr
  assert 'Traceback' not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


# Logits of every position must agree with the rwkv package within this fraction of their
# largest magnitude (fp32 models): the parity bound of every generation.
LOGIT_TOLERANCE = 2e-4


def assert_logits_close(ours, reference):
  ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
  error = np.abs(ours - reference).max() / np.abs(reference).max()
  assert error < LOGIT_TOLERANCE, f'max |logit difference| is {error:.2e} of the largest logit'
