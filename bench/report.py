"""What every benchmark shares: how a JAX function is timed, and what it records with its numbers
(the card, the date, the package versions; `<kind>_<card>_<date>.json` and `.md` in each output
directory)."""
import datetime
import importlib.metadata
import json
import pathlib
import platform
import re
import time

import numpy as np

PACKAGES = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'flax', 'optax', 'torch', 'triton',
            'flash-linear-attention', 'fla-core', 'rwkv-fla')


def versions() -> dict:
  """Python's and each installed package's version (the ones missing are left out)."""
  found = {'python': platform.python_version()}
  for package in PACKAGES:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def today() -> str:
  return datetime.date.today().isoformat()


def stem(kind: str, card: str, date: str) -> str:
  """The results files' name without extension, e.g. wkv6_nvidia-h200_2026-11-28."""
  return f'{kind}_{re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")}_{date}'


def write(out_dirs, name: str, record: dict, markdown: str) -> None:
  """`name`.json (the record) and `name`.md (the table) into every directory of `out_dirs`."""
  for out in out_dirs:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{name}.json').write_text(json.dumps(record, indent=2) + '\n')
    (out / f'{name}.md').write_text(markdown)


def time_jax(fn, args, reps, inner=5) -> float:
  """ms: the median over `reps` of the mean of `inner` back-to-back calls (hides dispatch gaps),
  after two calls that compile and warm up."""
  import jax  # pylint: disable=g-import-not-at-top  (the other benchmarks here need no JAX)
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return float(np.median(times)) * 1e3
