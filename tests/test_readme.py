"""The README's Flax example runs as written (on a tiny model in place of MODEL.pth)."""
import pathlib
import re
import subprocess
import sys

from rwkv_jax import checkpoint, synthetic

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def flax_example() -> str:
  section = README.read_text().split('### In your own Flax code', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_flax_example_trains_the_states_it_splits_off(tmp_path):
  model_path = tmp_path / 'MODEL.pth'
  checkpoint.write_pth(model_path, synthetic.random_checkpoint(seed=1))
  # Run the example's steps on random tokens, then check that what it put back moved and the
  # loss fell: the example must train the states, not merely run.
  check = '''
import numpy as np
tokens = np.random.default_rng(0).integers(0, 65536, (2, 17))
losses = []
for _ in range(8):
  states, opt_state, value = step(states, opt_state, weights, tokens)
  losses.append(float(value))
nnx.update(model, states)
assert losses[-1] < losses[0] - 0.2, losses
assert float(abs(model.initial_wkv()).max()) > 0.01
print('trained', losses[0], losses[-1])
'''
  result = subprocess.run([sys.executable, '-c', flax_example() + check], cwd=tmp_path, capture_output=True,
                          text=True)
  assert result.returncode == 0 and 'trained' in result.stdout, result.stderr[-2000:]
