"""What every benchmark records with its numbers: the card, the date, the package versions, and
where the results go (`<kind>_<card>_<date>.json` and `.md` in each output directory)."""
import datetime
import importlib.metadata
import json
import pathlib
import platform
import re

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
