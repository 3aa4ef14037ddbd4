"""One full state-tuning step, rwkv-jax vs RWKV-PEFT, on one GPU.

rwkv-jax: train.make_train_step (forward, chunked CE + L2Wrap, gradient w.r.t.
the states only, clip + Adam) on RWKV-6 1.6B / 3B / 7B shapes, bf16 random
weights drawn on the device with jax.random in the param-tree layout, optionally
int8 / nf4 (rwkv_jax.quant). The peer is RWKV-PEFT's own state-tuning step, imported from a
local checkout by bench/rwkv_peft_step.py, once per op it offers (--op cuda: its CUDA kernels,
--op fla: rwkv-fla), with its own weight initialisation (so --init_decays does not apply to it).
Every configuration runs in its own process: peak memory is process-wide, and an
OOM must not end the run. With several GPUs, each takes the next configuration
from one queue (one process per GPU at a time), and each GPU keeps a
persistent JAX cache of the weight-drawing functions for its later processes.

  python bench/train_step.py --out DIR [DIR ...] [--quick] [--configs REGEX] [--tiny] [--init_decays]
                             [--gpus N] [--budget_s S] [--peft_repo PATH] [--peer_ops cuda,fla]
                             [--dataload pad,pack]

  --quick    only 1.6B ctx 1024 bsz 1 grad_cp 1, both implementations
  --configs  keep configurations whose name (e.g. 7B-1024x1-cp1-nf4) matches REGEX
  --tiny     2-layer C128 model, ctx 32, on whatever device there is (a CPU check)
  --gpus     GPUs to spread the configurations over (default: all); the whole table took
             11.6 minutes on one H200 (two calls) and 4.6 over two
  --init_decays  decays as RWKV-6 initialises them (time_decay in [-6, -1], decay LoRA ~0)
             instead of synthetic.py's steeper spread, which sends more WKV chunks to the
             backward's slower forms; results get an _init-decays suffix
  --peft_repo  the RWKV-PEFT checkout (default .peer/RWKV-PEFT, with its commit in
             .peer/RWKV-PEFT.commit); the results record its repository and commit
  --peer_ops   RWKV-PEFT's WKV ops to time, each a peer column (without a GPU: its CPU check)
  --dataload   instead of the table above, real documents at ctx 512 (1.6B x060 and 1.5B x070): the
             bundled demo chat data's lengths and a log-normal (median 150 tokens, sigma 1), one a
             row (pad; RWKV-PEFT too) or packed (pack); results get a _dataload suffix and report
             tokens of real documents a second (doc tok/s: a step's document tokens, data.doc_spans,
             over its time; averaged over 20,000 drawn documents, the timed batch is the first rows)

Writes train_step_<card>_<date>.json and .md into every --out directory and
prints the table.

MFU counts matrix products only: 2 FLOP per matrix parameter (body incl. the
LoRA-style mixes, and the head; not the embedding) per token and pass; a
state-tuning step makes 2 passes (forward, activation gradients; no weight
gradients), 3 with grad_cp (the forward again). The WKV recurrence is left out.
The peak is a large bf16 matmul measured through JAX in the same run.
"""
import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # before jax: peaks must be the step's own

import argparse  # pylint: disable=g-import-not-at-top,g-bad-import-order
import collections
import dataclasses
import functools
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import report  # pylint: disable=g-import-not-at-top
from rwkv_jax.config import RWKVConfig  # pylint: disable=g-import-not-at-top
from rwkv_jax.synthetic import TINY  # pylint: disable=g-import-not-at-top

X070_LORA = lambda C: (('w', _lora(1.8, 0.5, C)), ('a', _lora(1.8, 0.5, C)), ('v', _lora(1.3, 0.5, C)),
                       ('g', _lora(0.6, 0.8, C)))


def _lora(scale, power, C):
  """RWKV-7's suggested LoRA width, which the released 1.5B's (96/96/64/256 at C=2048) follow."""
  return max(32, int(round(scale * C**power / 32)) * 32)


MODELS = {
    '1.6B': RWKVConfig(version='6', n_layer=24, n_embd=2048, head_size=64, vocab_size=65536, dim_ffn=7168,
                       lora=(('mix', 32), ('decay', 64))),
    '3B': RWKVConfig(version='6', n_layer=32, n_embd=2560, head_size=64, vocab_size=65536, dim_ffn=8960,
                     lora=(('mix', 32), ('decay', 64))),
    '7B': RWKVConfig(version='6', n_layer=32, n_embd=4096, head_size=64, vocab_size=65536, dim_ffn=14336,
                     lora=(('mix', 64), ('decay', 128))),
    'x052-1.5B': RWKVConfig(version='5', n_layer=24, n_embd=2048, head_size=64, vocab_size=65536, dim_ffn=7168,
                            lora=()),
    'x070-1.5B': RWKVConfig(version='7', n_layer=24, n_embd=2048, head_size=64, vocab_size=65536, dim_ffn=8192,
                            lora=X070_LORA(2048)),
    'x070-2.9B': RWKVConfig(version='7', n_layer=32, n_embd=2560, head_size=64, vocab_size=65536, dim_ffn=10240,
                            lora=X070_LORA(2560)),
    'x070-7.2B': RWKVConfig(version='7', n_layer=32, n_embd=4096, head_size=64, vocab_size=65536, dim_ffn=16384,
                            lora=X070_LORA(4096)),
    'tiny': dataclasses.replace(TINY, vocab_size=1024),
    'tiny-x070': RWKVConfig(version='7', n_layer=2, n_embd=128, head_size=64, vocab_size=1024, dim_ffn=512,
                            lora=(('w', 32), ('a', 32), ('v', 32), ('g', 32))),
}
PEAK_FALLBACK = 989e12  # H100 SXM dense bf16 datasheet figure, used only if the measurement fails
STEPS, WARMUP = 10, 3  # timed steps (median), warm-up steps


def step_counts(case) -> tuple[int, int]:
  return (2, 1) if case.model.startswith('tiny') else (STEPS, WARMUP)  # tiny only checks that the code runs
WORKER_TIMEOUT_S = 240
PEER_TIMEOUT_S = 420  # its CUDA build, or rwkv-fla's Triton autotuning in the first step, take minutes
PEER_PREFIX = 'rwkv-peft-'  # + op: the peer's rows
DEFAULT_PEFT_REPO = ROOT / '.peer' / 'RWKV-PEFT'
RESERVE_S = 45  # a configuration is not started with less than this left of --budget_s


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  ctx_len: int
  micro_bsz: int
  grad_cp: int
  quant: str = 'none'
  dataload: str = ''  # with `lengths`: 'pad' or 'pack' batches of documents of those lengths
  lengths: str = ''  # a key of LENGTHS; '' for rows of random tokens, all of them taking a loss

  @property
  def name(self):
    documents = f'-{self.dataload}-{self.lengths}' if self.lengths else ''
    return f'{self.model}-{self.ctx_len}x{self.micro_bsz}-cp{self.grad_cp}-{self.quant}{documents}'

  def impls(self):
    # RWKV-PEFT dropped quantized training, never state-tuned RWKV-5, and pads every document.
    peer = self.quant == 'none' and MODELS[self.model].version != '5' and self.dataload != 'pack'
    return ('rwkv-jax', 'peer') if peer else ('rwkv-jax',)


# In priority order: when --budget_s runs short, the tail is skipped.
CASES = (Case('1.6B', 1024, 1, 1), Case('1.6B', 1024, 1, 1, 'int8'), Case('1.6B', 1024, 1, 1, 'nf4'),
         Case('1.6B', 1024, 1, 0), Case('1.6B', 512, 8, 1), Case('7B', 1024, 1, 1), Case('3B', 1024, 1, 1),
         Case('7B', 1024, 1, 1, 'int8'), Case('7B', 1024, 1, 1, 'nf4'),
         Case('x070-1.5B', 1024, 1, 1), Case('x070-1.5B', 512, 8, 1), Case('x070-2.9B', 1024, 1, 1),
         Case('x070-7.2B', 1024, 1, 1), Case('x052-1.5B', 1024, 1, 1), Case('x052-1.5B', 512, 8, 1))
TINY_CASES = (Case('tiny', 32, 2, 1), Case('tiny', 32, 2, 0), Case('tiny', 32, 2, 1, 'int8'),
              Case('tiny', 32, 2, 1, 'nf4'), Case('tiny-x070', 32, 2, 1), Case('tiny-x070', 32, 2, 1, 'nf4'))
LOGNORMAL_SIGMA = 1.0  # of the log-normal lengths: chosen before any measurement, a broad spread
DOC_SAMPLE = 20000  # documents drawn to average a step's document tokens over


def document_cases(dataloads: list[str], tiny: bool) -> list[Case]:
  """--dataload: each model and length distribution, the modes in the order given."""
  models, ctx_len, bsz = (('tiny', 'tiny-x070'), 64, 2) if tiny else (('1.6B', 'x070-1.5B'), 512, 8)
  return [Case(model, ctx_len, bsz, 1, dataload=dataload, lengths=lengths)
          for model in models for lengths in LENGTHS for dataload in dataloads]


def demo_lengths(rng, n: int) -> np.ndarray:
  """Lengths of the bundled demo chat data's documents (World-tokenized, END_OF_DOC included), drawn."""
  from rwkv_jax import tokenizer  # pylint: disable=g-import-not-at-top
  path = ROOT / 'rwkv_jax' / 'demo_data' / 'demo.jsonl'
  lines = [json.loads(line)['text'] for line in path.read_text().splitlines() if line.strip()]
  return rng.choice([len(ids) + 1 for ids in tokenizer.encode_batch(lines)], n)


LENGTHS = {
    'demo': demo_lengths,
    'lognormal': lambda rng, n: np.maximum(np.round(np.exp(rng.normal(np.log(150), LOGNORMAL_SIGMA, n))), 2),
}


def document_fill(case: Case) -> float:
  """The share of a step's positions that hold document tokens (data.doc_spans), for DOC_SAMPLE
  documents of the case's lengths one a row (pad) or packed (pack)."""
  from rwkv_jax import data  # pylint: disable=g-import-not-at-top
  lengths = LENGTHS[case.lengths](np.random.default_rng(0), DOC_SAMPLE).astype(np.int64)
  rows = data.pack_documents(lengths, case.ctx_len).num_rows if case.dataload == 'pack' else len(lengths)
  return data.doc_spans(lengths, case.ctx_len).sum() / (rows * case.ctx_len)


def packed_doc_starts(case: Case) -> np.ndarray:
  """[1, micro_bsz, M] document-start flags of the first rows that the case's lengths pack into."""
  from rwkv_jax import data  # pylint: disable=g-import-not-at-top
  lengths = LENGTHS[case.lengths](np.random.default_rng(0), DOC_SAMPLE).astype(np.int64)
  sampler = data.Sampler(data.TokenData(np.zeros(int(lengths.sum()), np.int32), np.cumsum(lengths) - lengths,
                                        lengths, case.lengths), case.ctx_len, case.micro_bsz, 'pack', epoch_steps=1,
                         shuffle=False)
  return sampler.doc_starts(0, 0)[None]


def matmul_params(cfg: RWKVConfig) -> int:
  """Parameters that take part in matrix products per token: the body's matrices (the
  projections and the LoRA-style mixes, not the per-head [H, N] vectors) and the head."""
  from rwkv_jax.models import generation  # pylint: disable=g-import-not-at-top
  is_matrix = lambda s: len(s) >= 2 and s[-2] > 1 and s != (cfg.n_head, cfg.head_size)
  gen = generation(cfg.version)
  body = sum(int(np.prod(s)) for i in range(cfg.n_layer) for s in gen.block_shapes(cfg, i).values() if is_matrix(s))
  return body + cfg.vocab_size * cfg.n_embd


def flops_per_token(cfg: RWKVConfig, grad_cp: int) -> int:
  return 2 * matmul_params(cfg) * (3 if grad_cp else 2)


# ---------------------------------------------------------------- rwkv-jax worker (its own process)

class JaxRng:
  """The two draws synthetic.random_tensor makes, from jax.random on the device."""

  def __init__(self, key):
    self.key = key

  def normal(self, loc, scale, shape):
    import jax  # pylint: disable=g-import-not-at-top
    return loc + scale * jax.random.normal(self.key, shape)

  def uniform(self, low, high, shape):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.random.uniform(self.key, shape, minval=low, maxval=high)


def random_model(cfg: RWKVConfig, quant_mode: str, seed: int = 0, host_embedding: bool = True,
                 init_decays: bool = False, implementation: str | None = None):
  """An RWKV model with bf16 random weights on the device, drawn a tensor at a time and quantized
  as drawn, so no fp32 or dense copy of the model ever exists: it would set the process's peak.
  The embedding goes to host memory as drawn, where the trainer keeps it (train.host_embedding);
  host_embedding=False keeps it on the device (for eval_shape)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rwkv_jax import checkpoint, quant, synthetic  # pylint: disable=g-import-not-at-top
  from rwkv_jax.models import RWKV, generation  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnums=(0, 1, 3))
  def draw(leaf, shape, key, mode):
    value = synthetic.random_tensor(cfg, leaf, shape, JaxRng(key), init_decays).astype(jnp.bfloat16)
    return value if mode == 'none' else quant.quantize(value, mode)

  matrices = tuple(f'.{group}.{name}.weight' for group, name in generation(cfg.version).QUANTIZED)
  keys = iter(jax.random.split(jax.random.key(seed), len(checkpoint.expected_shapes(cfg))))

  def leaf(name, shape):
    mode = 'none' if quant_mode == 'none' else (
        quant_mode if name.endswith(matrices) else 'int8' if name in ('emb.weight', 'head.weight') else 'none')
    # One compile per distinct tensor of a layer, not per layer (block 0 of x070 differs: its own).
    value = draw(re.sub(r'^blocks\.([1-9]\d*)\.', 'blocks.1.', name), shape, next(keys), mode)
    # The trainer keeps the embedding on the host (train.host_embedding); so does this, as drawn.
    return jax.tree.map(np.asarray, value) if host_embedding and name == 'emb.weight' else value

  return RWKV(cfg, checkpoint.build_params(cfg, leaf), implementation)


def check_layout(cfg: RWKVConfig, quant_mode: str) -> None:
  """The device-drawn model must match what the trainer loads from a .pth and quantizes (at tiny size)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rwkv_jax import checkpoint, quant, synthetic  # pylint: disable=g-import-not-at-top
  from rwkv_jax.models import RWKV  # pylint: disable=g-import-not-at-top
  tensors = synthetic.random_checkpoint(cfg, dtype=jnp.bfloat16)
  loaded = quant.quantize_model(RWKV(cfg, checkpoint.params_from_tensors(tensors, cfg)), quant_mode)
  drawn = jax.eval_shape(lambda: nnx.state(random_model(cfg, quant_mode, host_embedding=False)))
  shapes = lambda tree: {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  assert shapes(nnx.state(loaded)) == shapes(drawn), 'random_model does not match a loaded, quantized model'


def jax_worker(case: Case, implementation: str | None, init_decays: bool, cache_dir: str | None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from pallas_kernels.common import default_implementation  # pylint: disable=g-import-not-at-top
  from rwkv_jax import quant, train  # pylint: disable=g-import-not-at-top
  if cache_dir:  # drawing the weights took ~10 s a process: later processes load its compiled functions
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  cfg = MODELS[case.model]
  if case.model.startswith('tiny'):
    check_layout(cfg, case.quant)
  model = random_model(cfg, case.quant, init_decays=init_decays, implementation=implementation)
  embedding = train.host_embedding(model)
  graphdef, states, weights = train.split(model)
  if cache_dir:  # but not the step: compile_s stays a cold compile
    jax.config.update('jax_persistent_cache_min_compile_time_secs', float('inf'))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, case.micro_bsz, case.ctx_len + 1), np.int32)
  # Token values do not change a step's time: random ones stand in for the documents' (all taking a
  # loss), and a pack batch adds its rows' document-start flags.
  targets = jax.device_put(tokens[..., 1:])
  after_inputs = (targets, jax.device_put(packed_doc_starts(case))) if case.dataload == 'pack' else (targets,)
  inputs = lambda: jax.device_put(quant.take_rows(embedding, tokens[..., :-1]))
  opt = train.optimizer(train.schedule('cos', 1.0, 0.01, 10, 1000))
  train_state = train.init_train_state(states, opt)
  step = train.make_train_step(graphdef, opt, remat=bool(case.grad_cp))
  t0 = time.perf_counter()
  compiled = step.lower(train_state, weights, inputs(), *after_inputs).compile()
  compile_s = time.perf_counter() - t0
  steps, warmup = step_counts(case)
  # As in train_state.py: one step stays queued on the device while the host gathers and sends
  # the next batch, dispatches the next step and reads the previous loss. A step's time is the
  # interval between two loss reads.
  reads, batch, pending = [], inputs(), None
  for _ in range(warmup + steps + 1):
    train_state, loss = compiled(train_state, weights, batch, *after_inputs)
    batch = inputs()
    if pending is not None:
      float(pending)
      reads.append(time.perf_counter())
    pending = loss
  loss = float(pending)
  times = np.diff(reads)[warmup - 1:]
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return {'step_ms': statistics.median(times) * 1e3, 'peak_gb': peak / 1e9 if peak else None,
          'compile_s': compile_s, 'loss': loss, 'wkv': implementation or default_implementation(case.ctx_len)}


def peak_worker() -> dict:
  """Dense bf16 matmul rate through JAX, and what the run is on."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  n = 8192 if device.platform == 'gpu' else 1024
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(5):  # 10 back-to-back products per sample hide the dispatch gaps
    t0 = time.perf_counter()
    jax.block_until_ready([matmul(a, a) for _ in range(10)])
    times.append((time.perf_counter() - t0) / 10)
  return {'card': device.device_kind, 'platform': device.platform, 'gpus': jax.device_count(),
          'peak_flops': 2 * n**3 / statistics.median(times)}


# ---------------------------------------------------------------- driver

def run_process(argv: list[str], timeout_s: float, gpu: int | None = None) -> dict:
  """Runs a worker (on one GPU if given); its result is the JSON after 'RESULT ', anything else an error."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  if gpu is not None:
    env['CUDA_VISIBLE_DEVICES'] = str(gpu)
  try:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {'error': f'timeout after {timeout_s:.0f} s'}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  text = proc.stderr + proc.stdout
  if re.search(r'RESOURCE_EXHAUSTED|out of memory|OutOfMemory', text, re.IGNORECASE):
    return {'error': 'OOM: ' + next(l for l in text.splitlines() if re.search(r'RESOURCE_EXHAUSTED|out of memory',
                                                                                l, re.IGNORECASE))[:300]}
  lines = [l for l in text.splitlines() if l.strip()]
  raised = [l for l in lines if re.match(r'[\w.]*(Error|Exception)\b', l)]  # the exception, not JAX's footnote
  return {'error': f'exit {proc.returncode}: ' + ((raised or lines or ['no output'])[-1][:300])}


def peer_argv(case: Case, op: str, peft_repo: pathlib.Path, on_gpu: bool) -> list[str]:
  """bench/rwkv_peft_step.py for one configuration and op; without a GPU, its CPU check."""
  cfg = MODELS[case.model]
  argv = ['bench/rwkv_peft_step.py', '--peft_repo', str(peft_repo.resolve()), '--version', f'x0{cfg.version}0',
          '--op', op]
  if not on_gpu:
    return argv + ['--cpu_check']
  steps, warmup = step_counts(case)
  return argv + ['--n_layer', str(cfg.n_layer), '--n_embd', str(cfg.n_embd), '--ctx_len', str(case.ctx_len),
                 '--micro_bsz', str(case.micro_bsz), '--grad_cp', str(case.grad_cp), '--steps', str(steps),
                 '--warmup', str(warmup)]


def run_case(case: Case, impl: str, implementation: str | None, init_decays: bool, timeout_s: float,
             gpu: int | None, cache_dir: str | None, peft_repo: pathlib.Path | None) -> dict:
  if impl.startswith(PEER_PREFIX):
    if peft_repo is None:
      return {'error': f'no RWKV-PEFT checkout at {DEFAULT_PEFT_REPO}: pass --peft_repo'}
    return run_process(peer_argv(case, impl[len(PEER_PREFIX):], peft_repo, gpu is not None), timeout_s, gpu)
  spec = {'case': dataclasses.asdict(case), 'init_decays': init_decays, 'cache_dir': cache_dir}
  result = run_process(['bench/train_step.py', '--worker', json.dumps({**spec, 'implementation': implementation})],
                       timeout_s, gpu)
  if 'error' in result and not result['error'].startswith(('OOM', 'timeout')) and implementation is None:
    # The Pallas kernel is new: if it fails, time the XLA fallback rather than lose the row.
    retry = run_process(['bench/train_step.py', '--worker', json.dumps({**spec, 'implementation': 'xla_chunked'})],
                        timeout_s, gpu)
    retry['note'] = f'default WKV failed ({result["error"][:200]}); timed xla_chunked'
    return retry if 'error' not in retry else result
  return result


def make_row(case: Case, impl: str, result: dict, peak_flops: float) -> dict:
  row = {'impl': impl, **dataclasses.asdict(case)}
  row.update({k: None for k in ('tok_s', 'peak_gb', 'mfu', 'step_ms', 'compile_s', 'doc_fill', 'doc_tok_s')})
  row.update(result)
  if row.get('step_ms'):
    row['tok_s'] = case.ctx_len * case.micro_bsz / (row['step_ms'] / 1e3)
    row['mfu'] = flops_per_token(MODELS[case.model], case.grad_cp) * row['tok_s'] / peak_flops
  if case.lengths:
    row['doc_fill'] = document_fill(case)
    row['doc_tok_s'] = row['tok_s'] * row['doc_fill'] if row['tok_s'] else None
  return row


def fmt(value, spec):
  return '—' if value is None else format(value, spec)


def case_of(row: dict) -> Case:
  return Case(row['model'], row['ctx_len'], row['micro_bsz'], row['grad_cp'], row['quant'], row.get('dataload', ''),
              row.get('lengths', ''))


def faster_peer(peers: list[dict]) -> dict:
  """The peer op with the higher tok/s, the one the ratios are taken against ({} if none ran)."""
  timed = [row for row in peers if row.get('tok_s')]
  return max(timed, key=lambda row: row['tok_s']) if timed else {}


def peer_note(record: dict) -> str:
  peer = record.get('peer') or {}
  rows = [r for r in record['results'] if r['impl'].startswith(PEER_PREFIX)]
  fla = next((r['versions']['rwkv-fla'] for r in rows if 'rwkv-fla' in (r.get('versions') or {})), None)
  lora = next((r['lora'] for r in rows if r.get('lora')), None)
  return (f'Peer: RWKV-PEFT\'s own state-tuning step ({peer.get("commit") or "commit unknown"}, '
          'bench/rwkv_peft_step.py): its model code, bf16, only time_state trained, its cross-entropy + L2Wrap, '
          'torch Adam; --op cuda = its CUDA kernels, --op fla = rwkv-fla' + (f' {fla}' if fla else '')
          + '. Ratios are rwkv-jax against the faster peer op of the row; peer first step = its first step '
          '(Triton autotuning for fla; the CUDA build is before it).'
          + (f' x070: RWKV-PEFT derives its LoRA widths from n_embd (w/a/v/g {"/".join(map(str, lora.values()))} '
             'in its first x070 row); rwkv-jax\'s rows use the widths of their MODELS entry.' if lora else ''))


def markdown(record: dict) -> str:
  rows = record['results']
  ops = (record.get('peer') or {}).get('ops', [])
  find = lambda impl, case: next((r for r in rows if r['impl'] == impl and case_of(r) == case), None) or {}
  peer_heads = ''.join(f'| RWKV-PEFT ({op}) tok/s | RWKV-PEFT ({op}) peak GB ' for op in ops)
  lines = [f'# State-tuning step: rwkv-jax vs RWKV-PEFT ({record["card"]}, {record["date"]})', '',
           f'Peak used for MFU: {record["peak_tflops"]:.0f} TFLOP/s ({record["peak_source"]}). '
           'Quantized rows are compared with the peer\'s bf16 row of the same shape. ' + peer_note(record)
           + (f' Configurations spread over {record["gpus"]} GPUs of one machine, one process per GPU at a time.'
              if record.get('gpus', 1) > 1 else '')
           + (' rwkv-jax decays as RWKV-6 initialises them (--init_decays).' if record.get('decays') == 'init' else ''),
           '',
           f'| config | WKV | rwkv-jax tok/s | rwkv-jax peak GB {peer_heads}| speed vs faster peer '
           '| memory vs that peer | rwkv-jax MFU | rwkv-jax compile s | peer first step s |',
           '|---' * (9 + 2 * len(ops)) + '|']
  for case in dict.fromkeys(case_of(r) for r in rows):
    ours = find('rwkv-jax', case)
    peers = [find(PEER_PREFIX + op, dataclasses.replace(case, quant='none')) for op in ops]
    best = faster_peer(peers)
    ratio = lambda k: (f'{ours[k] / best[k]:.2f}x' if ours.get(k) and best.get(k) else '—')
    peer_cells = ''.join(f'| {fmt(p.get("tok_s"), ",.0f")} | {fmt(p.get("peak_gb"), ".2f")} ' for p in peers)
    first_steps = ' / '.join(f'{op} {fmt(p.get("compile_s"), ".1f")}' for op, p in zip(ops, peers))
    lines.append(
        f'| {case.name} | {ours.get("wkv", "—")} | {fmt(ours.get("tok_s"), ",.0f")} '
        f'| {fmt(ours.get("peak_gb"), ".2f")} {peer_cells}| {ratio("tok_s")} | {ratio("peak_gb")} '
        f'| {fmt(ours.get("mfu"), ".1%")} | {fmt(ours.get("compile_s"), ".1f")} | {first_steps or "—"} |')
  errors = [f'- {r["impl"]} {case_of(r).name}: {r.get("error") or r.get("note")}'
            for r in rows if r.get('error') or r.get('note')]
  return '\n'.join(lines + documents_table(record) + ([''] + errors if errors else [])) + '\n'


def documents_table(record: dict) -> list[str]:
  """--dataload: tokens of real documents a second, pack against our pad and RWKV-PEFT's (faster op) pad."""
  rows = [r for r in record['results'] if r.get('lengths')]
  if not rows:
    return []
  ops = (record.get('peer') or {}).get('ops', [])
  find = lambda impl, case: next((r for r in rows if r['impl'] == impl and case_of(r) == case), None) or {}
  lines = ['', f'Tokens of real documents a second (doc tok/s = tok/s x the share of positions holding a document, '
           f'over {DOC_SAMPLE:,} drawn documents; log-normal sigma {LOGNORMAL_SIGMA}).', '',
           '| model | lengths | pad fill | pack fill | pad doc tok/s | pack doc tok/s | pack / pad '
           '| RWKV-PEFT pad doc tok/s | pack / RWKV-PEFT pad |', '|---' * 9 + '|']
  for case in dict.fromkeys(dataclasses.replace(case_of(r), dataload='') for r in rows):
    pad, pack = (find('rwkv-jax', dataclasses.replace(case, dataload=mode)) for mode in ('pad', 'pack'))
    peer = faster_peer([find(PEER_PREFIX + op, dataclasses.replace(case, dataload='pad')) for op in ops])
    ratio = lambda a, b: (f'{a["doc_tok_s"] / b["doc_tok_s"]:.2f}x' if a.get('doc_tok_s') and b.get('doc_tok_s')
                          else '—')
    lines.append(f'| {case.model} | {case.lengths} | {fmt(pad.get("doc_fill"), ".1%")} '
                 f'| {fmt(pack.get("doc_fill"), ".1%")} | {fmt(pad.get("doc_tok_s"), ",.0f")} '
                 f'| {fmt(pack.get("doc_tok_s"), ",.0f")} | {ratio(pack, pad)} '
                 f'| {fmt(peer.get("doc_tok_s"), ",.0f")} | {ratio(pack, peer)} |')
  return lines


def select_cases(args) -> list[Case]:
  cases = document_cases(args.dataload.split(','), args.tiny) if args.dataload else TINY_CASES if args.tiny else CASES
  if args.quick:
    cases = cases[:1]
  if args.configs:
    cases = [c for c in cases if re.search(args.configs, c.name)]
  return list(cases)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', nargs='+', default=[str(ROOT / 'bench' / 'results')], help='directories for json + md')
  p.add_argument('--quick', action='store_true', help='only the first configuration, both implementations')
  p.add_argument('--configs', help='regex on configuration names, e.g. "^1.6B" or "nf4|int8"')
  p.add_argument('--tiny', action='store_true', help='2-layer C128 model at ctx 32 (CPU check)')
  p.add_argument('--impls', default='rwkv-jax,peer', help='comma-separated subset of rwkv-jax,peer')
  p.add_argument('--implementation', help='WKV implementation for rwkv-jax (default: the platform default)')
  p.add_argument('--init_decays', action='store_true',
                 help='RWKV-6\'s initial decays (time_decay in [-6, -1], no decay LoRA) instead of steeper ones')
  p.add_argument('--budget_s', type=float, default=450, help='skip configurations that would start after this')
  p.add_argument('--gpus', type=int, help='GPUs to spread the configurations over (default: all visible)')
  p.add_argument('--peft_repo', type=pathlib.Path, default=DEFAULT_PEFT_REPO if DEFAULT_PEFT_REPO.exists() else None,
                 help='RWKV-PEFT checkout for the peer (default: .peer/RWKV-PEFT when it exists)')
  p.add_argument('--peer_ops', default='cuda,fla', help='RWKV-PEFT ops to time (--op of its train.py)')
  p.add_argument('--dataload', help='pad,pack (or one): real-document batches instead of the usual table')
  p.add_argument('--worker', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    spec = json.loads(args.worker)
    result = (peak_worker() if spec.get('kind') == 'peak' else
              jax_worker(Case(**spec['case']), spec['implementation'], spec['init_decays'], spec['cache_dir']))
    print('RESULT ' + json.dumps(result), flush=True)
    return

  start = time.perf_counter()
  device = run_process(['bench/train_step.py', '--worker', json.dumps({'kind': 'peak'})], 120)
  peak_flops, source = device.get('peak_flops'), 'measured: bf16 8192^3 matmul through JAX'
  if not peak_flops or device.get('platform') != 'gpu':
    peak_flops, source = PEAK_FALLBACK, f'H100 SXM datasheet (not measured: {device.get("error") or "no GPU"})'
  print(f'{device.get("card")}: {peak_flops / 1e12:.0f} TFLOP/s ({source})', flush=True)

  impls, peer_ops = args.impls.split(','), args.peer_ops.split(',')
  expand = lambda impl: [PEER_PREFIX + op for op in peer_ops] if impl == 'peer' else [impl]
  tasks = [(case, name) for case in select_cases(args) for impl in case.impls() if impl in impls
           for name in expand(impl)]
  queue = collections.deque(enumerate(tasks))
  rows = [None] * len(tasks)
  on_gpu = device.get('platform') == 'gpu'
  gpus = list(range(min(args.gpus or device['gpus'], device['gpus']))) if on_gpu else [None]

  # A peer op that read out of bounds once does so at every shape of that version (RWKV-PEFT's x060
  # --op fla hands rwkv-fla head-first tensors): its later rows of the version are not started.
  crashed = {}  # (version, impl) -> the configuration it crashed on

  def work(gpu):  # one GPU: the next task of the shared queue until it is empty
    cache_dir = tempfile.mkdtemp(prefix='train_step_jax_cache_')
    while True:
      try:
        index, (case, impl) = queue.popleft()
      except IndexError:
        shutil.rmtree(cache_dir, ignore_errors=True)
        return
      left = args.budget_s - (time.perf_counter() - start)
      version = MODELS[case.model].version
      if (version, impl) in crashed:
        result = {'error': f'not run: illegal memory access at {crashed[version, impl]}'}
      elif left < RESERVE_S:
        result = {'error': f'skipped: --budget_s {args.budget_s:.0f} spent'}
      else:
        try:  # a row that fails here must not end this GPU's thread and lose the rest of its queue
          limit_s = PEER_TIMEOUT_S if impl.startswith(PEER_PREFIX) else WORKER_TIMEOUT_S
          result = run_case(case, impl, args.implementation, args.init_decays, min(limit_s, left), gpu, cache_dir,
                            args.peft_repo)
        except Exception as e:  # pylint: disable=broad-exception-caught
          result = {'error': f'driver: {type(e).__name__}: {e}'[:300]}
      if impl.startswith(PEER_PREFIX) and 'illegal memory access' in result.get('error', ''):
        crashed.setdefault((version, impl), case.name)
      rows[index] = make_row(case, impl, {**result, 'gpu': gpu}, peak_flops)
      shown = {k: rows[index].get(k) for k in ('tok_s', 'step_ms', 'peak_gb', 'mfu', 'compile_s', 'wkv', 'error')}
      print(f'{time.perf_counter() - start:6.0f}s gpu {gpu} {impl:14s} {case.name}: {json.dumps(shown)}', flush=True)

  threads = [threading.Thread(target=work, args=(gpu,)) for gpu in gpus]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()

  card = device.get('card') or 'unknown'
  date = report.today()
  record = {'card': card, 'date': date, 'versions': report.versions(), 'peak_tflops': peak_flops / 1e12,
            'peak_source': source, 'decays': 'init' if args.init_decays else 'random', 'gpus': len(gpus),
            'flops_per_token': 'matmul params (body + head) x 2 x (3 if grad_cp else 2)', 'results': rows}
  if 'peer' in impls:
    commit = next((r['peer'] for r in rows if r['impl'].startswith(PEER_PREFIX) and r.get('peer')), None)
    record['peer'] = {'checkout': str(args.peft_repo), 'commit': commit, 'ops': peer_ops}
  table = markdown(record)
  suffix = ('_init-decays' if args.init_decays else '') + ('_dataload' if args.dataload else '')
  report.write(args.out, report.stem('train_step', card, date) + suffix, record, table)
  print(table)

if __name__ == '__main__':
  main()
