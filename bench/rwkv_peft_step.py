"""The peer: RWKV-PEFT's own state-tuning step, imported from a local checkout, timed on one GPU.

RWKV-PEFT (Joluck/RWKV-PEFT) tunes a state with `train.py --peft state --my_testing x060|x070
--op cuda|fla --precision bf16 --grad_cp 0|1`. This runs that step without its Lightning Trainer
and DeepSpeed, using its code for everything else:
  - its model classes (rwkvt/rwkv6, rwkvt/rwkv7), built and frozen by its load_peft_model: only
    the `time_state` parameters train;
  - its WKV kernels through its operator module (rwkvt/operator/rwkvop.py): `--op cuda` builds
    its CUDA kernels with torch's extension loader when imported, `--op fla` calls rwkv-fla (the
    package it imports as `rwkvfla`);
  - its LightningModule's training_step: cross-entropy plus its L2Wrap; blocks under
    torch.utils.checkpoint (non-reentrant) when grad_cp is 1, as its model does for state tuning.
Then backward, global-norm clip 1.0 (Lightning's gradient_clip_val) and torch Adam(0.9, 0.99,
1e-8) on the states (RWKV-PEFT's default betas and eps). Nothing of RWKV-PEFT is copied here.

Weights are random, as RWKV-PEFT's own constructors initialise them: load_peft_model "loads" an
empty state dict, which it does non-strictly. The module is built on the GPU and cast to bf16, as
DeepSpeed's bf16 mode does in a real run (the states too; Adam updates them in bf16, where
DeepSpeed would keep an fp32 master copy of these few MB). For x070 the LoRA widths come from
RWKV-PEFT's own formula of n_embd; the result lists them.

Stand-in modules (sys.modules) for packages the state path imports but never calls; each name
raises if it is reached:
  deepspeed  imported by rwkvt/rwkv{6,7}/model.py and, when found, by light_rwkv.py (its Adam
             classes). With --peft state the blocks are checkpointed by torch.utils.checkpoint,
             not deepspeed.checkpointing, and the optimizer is built here.
  peft       imported by rwkvt/peft_loading.py for LoRA-style tuning; load_peft_model takes its
             state branch (RWKV_TRAIN_TYPE == 'state') before the branch that uses peft.
  bitsandbytes is not imported by this RWKV-PEFT (its quantisation was removed): no stand-in.

Each configuration runs in its own process (the environment is read when RWKV-PEFT is imported);
bench/train_step.py starts them. The result line is `RESULT {json}`; a second one follows when
the op check (RWKV-PEFT's WKV call against a plain fp32 recurrence, at a small shape) has run.
The check is there because the calls can be wrong: read in the code, x060 with --op fla hands
head-first [B, H, T, K] tensors to rwkv-fla's chunk_rwkv6, which takes [B, T, H, K].

  python bench/rwkv_peft_step.py --peft_repo .peer/RWKV-PEFT --version x060 --n_layer 24 \\
      --n_embd 2048 --ctx_len 1024 --micro_bsz 1 --grad_cp 1 --op cuda
  python bench/rwkv_peft_step.py --peft_repo .peer/RWKV-PEFT --version x070 --cpu_check
"""
import argparse
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

VERSIONS = ('x060', 'x070')
OPS = ('cuda', 'fla')
HEAD_SIZE = 64
VOCAB_SIZE = 65536
LR = 1.0  # RWKV-PEFT's state-tuning demos start at lr_init 1
OP_ERROR_LIMIT = 0.05  # bf16 inputs and output: a correct kernel is near 4e-3; a wrong layout near 1


def peer_commit(repo: pathlib.Path) -> str:
  """'owner/name@commit' from the file written beside the checkout (an archive has no .git)."""
  marker = repo.parent / f'{repo.name}.commit'
  return marker.read_text().strip() if marker.exists() else f'{repo} (commit unknown)'


# ---------------------------------------------------------------- importing RWKV-PEFT

def stand_in(name: str, **attrs):
  """A module in sys.modules with a spec, so importlib.util.find_spec reports it as present."""
  module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, loader=None))
  module.__dict__.update(attrs)
  sys.modules[name] = module
  return module


def unreachable(name: str):
  def fail(*args, **kwargs):
    raise RuntimeError(f'{name} is a stand-in: RWKV-PEFT\'s state-tuning path was not expected to reach it')
  return fail


def install_stand_ins() -> None:
  adam = stand_in('deepspeed.ops.adam', DeepSpeedCPUAdam=unreachable('deepspeed.ops.adam.DeepSpeedCPUAdam'),
                  FusedAdam=unreachable('deepspeed.ops.adam.FusedAdam'))
  ops = stand_in('deepspeed.ops', adam=adam)
  checkpointing = stand_in('deepspeed.checkpointing', checkpoint=unreachable('deepspeed.checkpointing.checkpoint'))
  stand_in('deepspeed', ops=ops, checkpointing=checkpointing, __version__='stand-in')
  names = ('get_peft_model', 'LoraConfig', 'BoneConfig', 'MissConfig', 'TaskType', 'AdaLoraConfig',
           'PrefixTuningConfig')
  stand_in('peft', __all__=list(names), **{n: unreachable(f'peft.{n}') for n in names})


def set_environment(version: str, op: str, ctx_len: int) -> None:
  """What train.py exports for `--peft state --precision bf16 --op OP` (read at import time)."""
  os.environ.update({'RWKV_MY_TESTING': version, 'RWKV_CTXLEN': str(ctx_len), 'RWKV_HEAD_SIZE_A': str(HEAD_SIZE),
                     'RWKV_TRAIN_TYPE': 'state', 'WKV': op, 'FUSED_KERNEL': '0', 'RWKV_FLOAT_MODE': 'bf16',
                     'RWKV_JIT_ON': '0'})


def import_peft(repo: pathlib.Path, version: str, op: str, ctx_len: int):
  """Imports RWKV-PEFT's loader (and with it the model and operator modules); with --op cuda
  that builds its kernels. Its CUDA sources are opened relative to the checkout: chdir there."""
  install_stand_ins()
  set_environment(version, op, ctx_len)
  os.chdir(repo)
  sys.path.insert(0, str(repo))
  from rwkvt import peft_loading  # pylint: disable=g-import-not-at-top
  return peft_loading


def training_args(n_layer: int, n_embd: int, vocab_size: int, ctx_len: int, micro_bsz: int, grad_cp: int,
                  version: str, op: str):
  """RWKV-PEFT's args as train.py leaves them for a bf16 state-tuning run on one GPU."""
  from rwkvt.args_type import TrainingArgs  # pylint: disable=g-import-not-at-top
  args = TrainingArgs(vocab_size=vocab_size, ctx_len=ctx_len, micro_bsz=micro_bsz,
                      n_layer=n_layer, n_embd=n_embd, grad_cp=grad_cp, peft='state', data_type='binidx',
                      precision='bf16', head_size_a=HEAD_SIZE, head_size_divisor=8)
  args.my_testing, args.op, args.fused_kernel = version, op, False
  args.dim_att = n_embd
  args.dim_ffn = int((n_embd * 3.5) // 32 * 32)
  args.betas = (args.beta1, args.beta2)
  args.real_bsz = micro_bsz
  return args


def build_module(peft_loading, args, device: str):
  """RWKV-PEFT's LightningModule with its model, frozen but for the states, bf16 on `device`.

  Built under torch.device(device): its constructors draw the random weights there (drawing a
  1.6B's on two CPU cores took 30 s, and a 7B has 4.7 times as many; a real run loads them)."""
  with tempfile.TemporaryDirectory() as tmp, torch.device(device):
    empty = os.path.join(tmp, 'empty.pth')
    torch.save({}, empty)  # nothing to load: the weights keep RWKV-PEFT's own initialisation
    args.load_model = empty
    args, module = peft_loading.load_peft_model(args)
    module = module.to(dtype=torch.bfloat16)
  if device == 'cuda':
    torch.cuda.empty_cache()  # the fp32 weights' blocks: the peaks measured next are the step's own
  return module


def trainable(module) -> list[tuple[str, torch.nn.Parameter]]:
  return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def check_trainable(module, n_layer: int, n_embd: int) -> None:
  names = [name for name, _ in trainable(module)]
  expected = [f'model.blocks.{i}.att.time_state' for i in range(n_layer)]
  assert names == expected, f'trainable parameters {names[:4]}..., expected only the {n_layer} time_state'
  shape = (n_embd // HEAD_SIZE, HEAD_SIZE, HEAD_SIZE)
  for name, p in trainable(module):
    assert tuple(p.shape) == shape and p.dtype == torch.bfloat16, f'{name}: {tuple(p.shape)} {p.dtype}'


def lora_widths(module, version: str) -> dict | None:
  """x070's LoRA widths as RWKV-PEFT derived them from n_embd (released models differ)."""
  if version != 'x070':
    return None
  att = module.model.blocks[1].att
  return {name: getattr(att, f'{name}1').shape[1] for name in ('w', 'a', 'v', 'g')}


# ---------------------------------------------------------------- the step

def make_step(module):
  params = [p for _, p in trainable(module)]
  args = module.args
  opt = torch.optim.Adam(params, lr=LR, betas=args.betas, eps=args.adam_eps)

  def step(batch):
    loss = module.training_step(batch, 0)  # RWKV-PEFT's: cross-entropy + L2Wrap on its logits
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  return step


def random_batch(vocab_size: int, micro_bsz: int, ctx_len: int, device: str, seed: int = 1):
  generator = torch.Generator(device).manual_seed(seed)
  tokens = torch.randint(0, vocab_size, (micro_bsz, ctx_len + 1), device=device, generator=generator)
  return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def time_steps(step, batch, steps: int, warmup: int) -> dict:
  """CUDA only: first step (Triton autotuning for fla), warm-up, then the median of `steps`."""
  torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  step(batch)
  torch.cuda.synchronize()
  first_s = time.perf_counter() - t0
  for _ in range(warmup):
    step(batch)
  times = []
  for _ in range(steps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = step(batch)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  return {'step_ms': statistics.median(times) * 1e3, 'compile_s': first_s, 'loss': float(loss),
          'peak_gb': torch.cuda.max_memory_allocated() / 1e9,
          'peak_reserved_gb': torch.cuda.max_memory_reserved() / 1e9}


# ---------------------------------------------------------------- fp32 recurrences (checks)

def wkv6_reference(r, k, v, w, u, state_HxVxK):
  """RWKV-6 on RWKV-PEFT's [B, T, C] inputs, fp32: y_t = (S + u k_t v_t^T) r_t read before
  S <- S diag(exp(-exp(w_t))) + v_t k_t^T; S value-major [H, V, K] as its time_state."""
  B, T, C = r.shape
  H, N = u.shape
  r, k, v, w = (x.float().view(B, T, H, N) for x in (r, k, v, w))
  decay = torch.exp(-torch.exp(w))
  s = state_HxVxK.float().expand(B, H, N, N)
  ys = []
  for t in range(T):
    vk = v[:, t, :, :, None] * k[:, t, :, None, :]
    ys.append(((s + u.float()[None, :, None, :] * vk) * r[:, t, :, None, :]).sum(-1))
    s = s * decay[:, t, :, None, :] + vk
  return torch.stack(ys, 1).reshape(B, T, C)


def wkv7_reference(r, decay, k, v, a, b, state_HxVxK):
  """RWKV-7 on [B, T, C] inputs, fp32: S <- S diag(decay_t) + (S a_t) b_t^T + v_t k_t^T, then
  y_t = S r_t; S value-major [H, V, K] as RWKV-PEFT's x070 time_state."""
  B, T, C = r.shape
  H, N = state_HxVxK.shape[:2]
  r, decay, k, v, a, b = (x.float().view(B, T, H, N) for x in (r, decay, k, v, a, b))
  s = state_HxVxK.float().expand(B, H, N, N)
  ys = []
  for t in range(T):
    sa = (s * a[:, t, :, None, :]).sum(-1, keepdim=True)
    s = s * decay[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
    ys.append((s * r[:, t, :, None, :]).sum(-1))
  return torch.stack(ys, 1).reshape(B, T, C)


def wkv7_decay(w, op: str):
  """The decay from the `w` RWKV-PEFT's x070 time-mix passes: raw for its CUDA kernel (which
  clamps it as exp(-e^-0.5 sigmoid(w))), already soft-clamped log-log for fla."""
  w = w.float()
  return torch.exp(-math.exp(-0.5) * torch.sigmoid(w)) if op == 'cuda' else torch.exp(-torch.exp(w))


def op_error(version: str, op: str, device: str) -> float:
  """RWKV-PEFT's WKV call (as its time-mix makes it) against the fp32 recurrence on the same
  bf16 inputs: relative RMS error of the output, at B 2, T 64, H 2."""
  from rwkvt.operator import rwkvop  # pylint: disable=g-import-not-at-top
  B, T, H, N = 2, 64, 2, HEAD_SIZE
  C = H * N
  g = torch.Generator(device).manual_seed(0)
  randn = lambda *shape, scale=1.0: (scale * torch.randn(*shape, device=device, generator=g)).to(torch.bfloat16)
  r, k, v, state = randn(B, T, C), randn(B, T, C, scale=0.5), randn(B, T, C), randn(H, N, N, scale=0.5)
  if version == 'x060':
    w = (-5 * torch.rand(B, T, C, device=device, generator=g)).to(torch.bfloat16)  # decays in (0.37, 1)
    u = randn(H, N, scale=0.5)
    y = rwkvop.RUN_CUDA_RWKV6_STATE(B, T, C, H, r, k, v, w, u=u, s=state)
    expected = wkv6_reference(r, k, v, w, u, state)
  else:
    raw = randn(B, T, C, scale=2.0)
    w = raw if op == 'cuda' else (-F.softplus(-raw.float()) - 0.5).to(torch.bfloat16)
    kk = F.normalize(k.float().view(B, T, H, N), dim=-1).view(B, T, C).to(torch.bfloat16)
    a = torch.sigmoid(randn(B, T, C).float()).to(torch.bfloat16)
    y, _ = rwkvop.RUN_RWKV7_STATE(r, k, v, w, -kk, kk * a, state)
    expected = wkv7_reference(r, wkv7_decay(w, op), k, v, -kk, kk * a, state)
  y = y.float().reshape(B, T, C)
  return float(torch.linalg.norm(y - expected) / torch.linalg.norm(expected))


# ---------------------------------------------------------------- modes

def bench(args) -> None:
  repo = pathlib.Path(args.peft_repo).resolve()
  t0 = time.perf_counter()
  peft_loading = import_peft(repo, args.version, args.op, args.ctx_len)
  build_s = time.perf_counter() - t0  # --op cuda: its kernels compiled here
  targs = training_args(args.n_layer, args.n_embd, VOCAB_SIZE, args.ctx_len, args.micro_bsz, args.grad_cp,
                        args.version, args.op)
  with torch.no_grad():
    module = build_module(peft_loading, targs, 'cuda')
  check_trainable(module, args.n_layer, args.n_embd)
  batch = random_batch(VOCAB_SIZE, args.micro_bsz, args.ctx_len, 'cuda')
  result = time_steps(make_step(module), batch, args.steps, args.warmup)
  versions = {'torch': torch.__version__}
  if args.op == 'fla':
    versions['rwkv-fla'] = importlib.metadata.version('rwkv-fla')
  result.update({'op': args.op, 'wkv': f'RWKV-PEFT --op {args.op}', 'build_s': build_s, 'peer': peer_commit(repo),
                 'versions': versions, 'lora': lora_widths(module, args.version)})
  print('RESULT ' + json.dumps(result), flush=True)
  # A layout or convention mismatch in the op would make the timing meaningless, but the check can
  # also crash the process (out-of-bounds reads): the timing is printed first and stands alone.
  error = op_error(args.version, args.op, 'cuda')
  result['op_rel_err'] = error
  if error > OP_ERROR_LIMIT:
    result['note'] = (f'RWKV-PEFT --op {args.op} output differs from the {args.version} recurrence '
                      f'(relative error {error:.2f} at B 2, T 64, H 2)')
  print('RESULT ' + json.dumps(result), flush=True)


def cpu_check(args) -> None:
  """On CPU at L2 C128: RWKV-PEFT imports with the stand-ins, its model builds in bf16 with only
  the states trainable, its x070 LoRA widths follow its formula, and one full step (its
  training_step, backward, clip, Adam) runs with the WKV call replaced by the fp32 recurrences
  above: the loss is finite, every state gets a gradient and moves, and grad_cp 1 runs each
  block under torch.utils.checkpoint. The kernels themselves are only run on the GPU."""
  n_layer, n_embd, vocab, ctx_len, micro_bsz = 2, 128, 1024, 32, 2
  repo = pathlib.Path(args.peft_repo).resolve()
  peft_loading = import_peft(repo, args.version, 'fla', ctx_len)  # fla: imported, never run here
  package = 'rwkv6' if args.version == 'x060' else 'rwkv7'
  att = importlib.import_module(f'rwkvt.{package}.att')
  model_module = importlib.import_module(f'rwkvt.{package}.model')

  def wkv6(B, T, C, H, r, k, v, w, u, s):
    return wkv6_reference(r, k, v, w, u, s).to(r.dtype)

  def wkv7(r, k, v, w, a, b, s):
    return wkv7_reference(r, wkv7_decay(w, 'fla'), k, v, a, b, s).to(r.dtype), None

  att.RUN_CUDA_RWKV6_STATE, att.RUN_RWKV7_STATE = wkv6, wkv7  # the names its time-mix calls
  checkpointed = []

  def counting_checkpoint(*a, **kw):
    checkpointed.append(kw.get('use_reentrant'))
    return torch.utils.checkpoint.checkpoint(*a, **kw)

  model_module.torch_checkpoint = counting_checkpoint
  targs = training_args(n_layer, n_embd, vocab, ctx_len, micro_bsz, 1, args.version, 'fla')
  with torch.no_grad():
    module = build_module(peft_loading, targs, 'cpu')
  check_trainable(module, n_layer, n_embd)
  frozen = [p.dtype for _, p in module.named_parameters() if not p.requires_grad]
  assert frozen and all(d == torch.bfloat16 for d in frozen), 'weights must be bf16'
  with torch.no_grad():  # a nonzero state, so the state path is exercised and its gradients are not trivial
    for _, p in trainable(module):
      p.normal_(0, 0.5)
  before = [p.detach().clone() for _, p in trainable(module)]
  batch = random_batch(vocab, micro_bsz, ctx_len, 'cpu')
  loss = module.training_step(batch, 0)
  loss.backward()
  grads = [p.grad for _, p in trainable(module)]
  assert torch.isfinite(loss) and all(g is not None and float(g.float().abs().sum()) > 0 for g in grads)
  assert checkpointed == [False] * n_layer, f'checkpoint calls {checkpointed}, expected non-reentrant per block'
  module.zero_grad(set_to_none=True)
  step = make_step(module)
  step(batch)
  moved = [bool((p.detach() != b).any()) for (_, p), b in zip(trainable(module), before)]
  assert all(moved), 'Adam did not move every state'
  print('RESULT ' + json.dumps({'note': f'{args.version} CPU check passed (L2 C128, no kernel, no timing)',
                                'version': args.version, 'loss': float(loss.detach()),
                                'trainable': [n for n, _ in trainable(module)],
                                'lora': lora_widths(module, args.version), 'peer': peer_commit(repo)}), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--peft_repo', required=True, help='RWKV-PEFT checkout (e.g. .peer/RWKV-PEFT)')
  p.add_argument('--version', choices=VERSIONS, default='x060')
  p.add_argument('--op', choices=OPS, default='cuda')
  p.add_argument('--n_layer', type=int, default=24)
  p.add_argument('--n_embd', type=int, default=2048)
  p.add_argument('--ctx_len', type=int, default=1024)
  p.add_argument('--micro_bsz', type=int, default=1)
  p.add_argument('--grad_cp', type=int, choices=(0, 1), default=1)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--cpu_check', action='store_true', help='tiny model on CPU, no kernels (see cpu_check)')
  args = p.parse_args()
  if args.cpu_check:
    cpu_check(args)
  else:
    bench(args)


if __name__ == '__main__':
  main()
