"""Time and memory of building the token cache of a large jsonl (issue 32).

  python bench/data.py --mb 400 --head /tmp/data_head --peft .peer/RWKV-PEFT   # -> bench/results/

Generates a deterministic chat-style jsonl of about --mb megabytes (one "User: ...\\n\\nAssistant: ..."
document a line, ~800 bytes each, English words with some Chinese and emoji), then builds its
token cache in a fresh process with each of:
  new    this checkout's `data.load_data(path, 'jsonl')`
  head   the same call in another checkout (--head; e.g. `git worktree add /tmp/data_head HEAD`)
  peft   RWKV-PEFT's json2binidx_tool/tools/preprocess_data.py (--peft, a checkout), on every core
and reports for each: wall time of the build, tokens/s, MB/s, and memory, sampled every 100 ms over
the process and all its children: peak of the summed RSS, peak of the summed PSS (shared pages
divided among the processes sharing them, so the sum is the memory actually in use) and the
peak RSS of the largest single process. The caches are checked to hold the same tokens.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import report  # noqa: E402  (bench/report.py, beside this file)
from rwkv_jax import data  # noqa: E402  (after the path, so this checkout's package is the one read)

_BUILD = '''
import json, sys, time
from rwkv_jax import data
start = time.perf_counter()
tokens = data.load_data(sys.argv[1], 'jsonl')
print(json.dumps({'build_s': time.perf_counter() - start, 'tokens': tokens.num_tokens,
                  'docs': tokens.num_docs}))
'''


# ---------------------------------------------------------------------------------------------
# The input


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
  syllables = ['ka', 'to', 're', 'mi', 'sun', 'el', 'an', 'or', 'ing', 'the', 'st', 'qu', 'ph', 'ly']
  words = [''.join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(6000)]
  words += ['the', 'a', 'of', 'and', 'to', 'is', 'in', 'that', 'state', 'model', 'RWKV', 'token']
  words += ['你好', '世界', '模型', '训练', '数据', '状态', '😀', '🚀', '3.14', '2026', 'e.g.', '(x)']
  return np.array(words + [w + ',' for w in words[:500]] + [w + '.' for w in words[:500]], object)


def generate_jsonl(path: pathlib.Path, megabytes: int, seed: int = 0) -> None:
  """A chat-style jsonl of about `megabytes` MB, the same bytes for the same size and seed."""
  rng = np.random.default_rng(seed)
  words = _vocabulary(rng)
  target, written = megabytes * 10**6, 0
  with open(str(path) + '.tmp', 'w', encoding='utf-8') as out:
    while written < target:
      lines = []
      for _ in range(2000):
        turns = []
        for _ in range(rng.integers(1, 3)):
          question = ' '.join(words[rng.integers(0, len(words), rng.integers(8, 40))])
          answer = ' '.join(words[rng.integers(0, len(words), rng.integers(10, 100))])
          turns.append(f'User: {question}?\n\nAssistant: {answer}')
        lines.append(json.dumps({'text': '\n\n'.join(turns)}, ensure_ascii=False) + '\n')
      block = ''.join(lines)
      out.write(block)
      written += len(block.encode('utf-8'))
  os.replace(str(path) + '.tmp', path)


# ---------------------------------------------------------------------------------------------
# Measuring a build


def _tree(root: int) -> list[int]:
  """`root` and every process below it."""
  pids, todo = [], [root]
  while todo:
    pid = todo.pop()
    pids.append(pid)
    for children in pathlib.Path(f'/proc/{pid}/task').glob('*/children'):
      try:
        todo += map(int, children.read_text().split())
      except OSError:
        continue
  return pids


def _memory_kb(pid: int) -> tuple[int, int]:
  """(RSS, PSS) of one process in kB; zeros once it is gone."""
  try:
    rollup = pathlib.Path(f'/proc/{pid}/smaps_rollup').read_text().splitlines()
  except OSError:
    return 0, 0
  fields = {line.split(':')[0]: int(line.split()[1]) for line in rollup[1:] if line.endswith('kB')}
  return fields.get('Rss', 0), fields.get('Pss', 0)


def _cpu_s(pid: int) -> float:
  """User + system CPU seconds of one process so far; 0 once it is gone."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return 0.0
  fields = stat[stat.rindex(')') + 2:].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def measure(command: list[str], cwd: str, env: dict | None = None) -> dict:
  """Runs `command`, sampling the memory of its process tree; wall and CPU time, peaks, stdout.

  The machine's 1-minute load average before and after is kept: other work on the cores slows
  the runs, and the parallel one most.
  """
  start, cpu_by_pid = time.perf_counter(), {}
  load_before = os.getloadavg()[0]
  output = tempfile.TemporaryFile('w+')  # not a pipe: a full pipe would stall a chatty command
  process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                             text=True)
  peak_rss = peak_pss = peak_process_rss = 0
  while process.poll() is None:
    pids = _tree(process.pid)
    rss_pss_Px2 = np.array([_memory_kb(pid) for pid in pids])
    peak_rss, peak_pss = max(peak_rss, rss_pss_Px2[:, 0].sum()), max(peak_pss, rss_pss_Px2[:, 1].sum())
    peak_process_rss = max(peak_process_rss, rss_pss_Px2[:, 0].max())
    cpu_by_pid.update({pid: max(_cpu_s(pid), cpu_by_pid.get(pid, 0.0)) for pid in pids})
    time.sleep(0.1)
  wall = time.perf_counter() - start
  output.seek(0)
  stdout = output.read()
  if process.returncode != 0:
    raise RuntimeError(f'{command} failed ({process.returncode}):\n{stdout[-3000:]}')
  return {'wall_s': wall, 'cpu_s': sum(cpu_by_pid.values()),
          'load_average_1min': [load_before, os.getloadavg()[0]], 'peak_tree_rss_mib': int(peak_rss) / 1024,
          'peak_tree_pss_mib': int(peak_pss) / 1024,
          'peak_process_rss_mib': int(peak_process_rss) / 1024, 'stdout': stdout}


def _remove_cache(jsonl: pathlib.Path) -> None:
  for suffix in ('.tokens.bin', '.tokens.idx', '.tokens.json'):
    pathlib.Path(str(jsonl) + suffix).unlink(missing_ok=True)


def _digest(prefix: str) -> str:
  """A hash of the tokens and document lengths of a binidx pair, whatever its dtype."""
  loaded, digest = data.read_binidx(prefix), hashlib.sha256()
  digest.update(np.asarray(loaded.doc_lens, np.int64).tobytes())
  for start in range(0, loaded.num_tokens, 1 << 24):
    digest.update(np.asarray(loaded.tokens[start:start + (1 << 24)], np.int64).tobytes())
  return digest.hexdigest()


def run_load_data(checkout: str, jsonl: pathlib.Path) -> dict:
  _remove_cache(jsonl)
  # The checkout first; what PYTHONPATH already holds (e.g. wheels unpacked elsewhere) after it.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (checkout, os.environ.get('PYTHONPATH')))))
  result = measure([sys.executable, '-c', _BUILD, str(jsonl)], checkout, env)
  result.update(json.loads(result.pop('stdout').strip().splitlines()[-1]))
  result['tokens_digest'] = _digest(str(jsonl) + '.tokens')
  _remove_cache(jsonl)
  return result


def run_peft(peft: str, jsonl: pathlib.Path, workers: int) -> dict:
  tool = pathlib.Path(peft).resolve() / 'json2binidx_tool'
  prefix = jsonl.with_name('peft')
  command = [sys.executable, 'tools/preprocess_data.py', '--input', str(jsonl), '--output-prefix',
             str(prefix), '--vocab', 'rwkv_vocab_v20230424.txt', '--dataset-impl', 'mmap',
             '--tokenizer-type', 'RWKVTokenizer', '--append-eod', '--workers', str(workers)]
  result = measure(command, str(tool))
  result.pop('stdout')
  output = f'{prefix}_text_document'
  result['build_s'] = result['wall_s']
  loaded = data.read_binidx(output)
  result.update(tokens=loaded.num_tokens, docs=loaded.num_docs, tokens_digest=_digest(output))
  for suffix in ('.bin', '.idx'):
    pathlib.Path(output + suffix).unlink()
  return result


# ---------------------------------------------------------------------------------------------


def _machine() -> dict:
  cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
              if line.startswith('model name')), platform.processor())
  return {'cpu': cpu, 'cores': len(os.sched_getaffinity(0)),
          'memory_gib': os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30}


def _markdown(results: dict) -> str:
  machine = results['machine']
  lines = [f'# Token cache build, {results["jsonl_mb"]:.0f} MB chat-style jsonl '
           f'({results["docs"]} documents)', '',
           f'{machine["cpu"]}, {machine["cores"]} cores, {machine["memory_gib"]:.0f} GiB; '
           f'{results["date"]}. `python bench/data.py {results["args"]}`', '',
           f'versions: {results["versions"]}', '',
           '| path | build s | CPU s | Mtokens/s | MB/s | peak RSS, all processes (MiB) | '
           'peak PSS, all processes (MiB) | peak RSS, largest process (MiB) | same tokens as new |',
           '|---|---|---|---|---|---|---|---|---|']
  for name, run in results['runs'].items():
    lines.append(f'| {name} | {run["build_s"]:.1f} | {run["cpu_s"]:.0f} | '
                 f'{run["tokens"] / run["build_s"] / 1e6:.2f} | '
                 f'{results["jsonl_mb"] / run["build_s"]:.1f} | {run["peak_tree_rss_mib"]:.0f} | '
                 f'{run["peak_tree_pss_mib"]:.0f} | {run["peak_process_rss_mib"]:.0f} | '
                 f'{run["same_tokens_as_new"]} |')
  lines += ['', 'build s: the load_data call (head, new) or the whole json2binidx process (peft); '
            'both load_data runs also pay a few seconds of Python and JAX import outside it. '
            'CPU s: user + system time of the process and its workers, as last sampled. '
            'Memory is sampled every 100 ms over the process and its workers. 1-minute load average '
            'before / after each run: ' + ', '.join(
                f'{name} {run["load_average_1min"][0]:.1f} / {run["load_average_1min"][1]:.1f}'
                for name, run in results['runs'].items()) + '.']
  lines += ['', results['note']] if results.get('note') else []
  lines += [''] + [f'{name}: builds of {", ".join(f"{t:.1f}" for t in run["build_s_all"])} s, the fastest '
            'shown.' for name, run in results['runs'].items() if len(run.get('build_s_all', [])) > 1]
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mb', type=int, default=400, help='size of the generated jsonl')
  parser.add_argument('--dir', default='/tmp/rwkv_jax_data_bench', help='where the files go')
  parser.add_argument('--head', help='another checkout to time the same way (e.g. git HEAD)')
  parser.add_argument('--peft', help='an RWKV-PEFT checkout, to time its json2binidx')
  parser.add_argument('--out', nargs='*', default=[str(REPO_ROOT / 'bench' / 'results')],
                      help='directories for data_cpu-<cores>core_<date>_<mb>mb.json + .md')
  parser.add_argument('--keep', action='store_true', help='keep the generated jsonl')
  parser.add_argument('--note', default='', help='a line to add to the results')
  parser.add_argument('--repeat', type=int, default=1,
                      help='build with head and new this many times each, keep the fastest')
  args = parser.parse_args()
  folder = pathlib.Path(args.dir)
  folder.mkdir(parents=True, exist_ok=True)
  jsonl = folder / f'chat_{args.mb}mb.jsonl'
  if not jsonl.exists():
    start = time.perf_counter()
    generate_jsonl(jsonl, args.mb)
    print(f'generated {jsonl} in {time.perf_counter() - start:.0f} s', flush=True)
  checkouts = {'head': args.head, 'new': str(REPO_ROOT)} if args.head else {'new': str(REPO_ROOT)}
  tries = {name: [] for name in checkouts}
  for _ in range(args.repeat):  # alternating, so that other work on the machine hits both alike
    for name, checkout in checkouts.items():
      tries[name].append(run_load_data(checkout, jsonl))
      print(name, tries[name][-1], flush=True)
  runs = {name: min(found, key=lambda run: run['build_s']) for name, found in tries.items()}
  for name, run in runs.items():
    run['build_s_all'] = [each['build_s'] for each in tries[name]]
  if args.peft:
    runs['peft'] = run_peft(args.peft, jsonl, len(os.sched_getaffinity(0)))
    print('peft', runs['peft'], flush=True)
  for run in runs.values():
    run['same_tokens_as_new'] = run['tokens_digest'] == runs['new']['tokens_digest']
  versions = {**report.versions(), 'pyrwkv-tokenizer': importlib.metadata.version('pyrwkv-tokenizer')}
  results = {'date': report.today(), 'machine': _machine(), 'versions': versions,
             'args': ' '.join(sys.argv[1:]), 'jsonl_mb': jsonl.stat().st_size / 1e6,
             'docs': runs['new']['docs'], 'tokens': runs['new']['tokens'], 'runs': runs,
             'note': args.note}
  if not args.keep:
    jsonl.unlink()
  print(_markdown(results))
  card = f'cpu-{results["machine"]["cores"]}core'
  name = f'{report.stem("data", card, results["date"])}_{args.mb}mb'
  report.write(args.out, name, results, _markdown(results))


if __name__ == '__main__':
  main()
