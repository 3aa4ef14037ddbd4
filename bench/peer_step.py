"""The peer: one RWKV-PEFT-style state-tuning step in PyTorch, timed on one GPU.

What RWKV-PEFT does for `--train_type state` on RWKV-6, written from the model
math (no Lightning/DeepSpeed): bf16 frozen weights, one trainable fp32 state
[H, V, K] per layer shared by the batch, each block under non-reentrant
torch checkpoint when grad_cp is 1, cross-entropy over the full bf16 logits with
L2Wrap's extra gradient, global-norm clip 1.0 and Adam(0.9, 0.99, 1e-8) on the
states. The WKV is fla's chunk_rwkv6 on CUDA; without CUDA a plain loop stands in
(same math, for checking on CPU only).

Run by bench/train_step.py, one configuration per process:
  python bench/peer_step.py --config '{"n_layer": 24, ...}' --ctx_len 1024 --micro_bsz 1 --grad_cp 1
  python bench/peer_step.py --check_loss    # CPU: loss and state gradient vs rwkv_jax.train.loss_fn
"""
import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from rwkv_jax import synthetic  # pylint: disable=g-import-not-at-top
from rwkv_jax.checkpoint import expected_shapes  # pylint: disable=g-import-not-at-top
from rwkv_jax.config import RWKVConfig  # pylint: disable=g-import-not-at-top

L2WRAP = 1e-4
GN_EPS = 64e-5


class TorchRng:
  """The two draws synthetic.random_tensor makes, from torch on a device."""

  def __init__(self, device, seed=0):
    self.device = device
    self.generator = torch.Generator(device).manual_seed(seed)

  def normal(self, loc, scale, shape):
    return loc + scale * torch.randn(shape, device=self.device, generator=self.generator)

  def uniform(self, low, high, shape):
    return low + (high - low) * torch.rand(shape, device=self.device, generator=self.generator)


def random_weights(cfg: RWKVConfig, device, dtype, init_decays=False) -> dict[str, torch.Tensor]:
  """Official-layout weights drawn on `device`, one tensor at a time (a 7B never exists in fp32)."""
  rng = TorchRng(device)
  return {name: synthetic.random_tensor(name, shape, rng, init_decays).to(dtype)
          for name, shape in expected_shapes(cfg).items()}


def wkv_loop(r, k, v, w_log, u, s0_BxHxKxV):
  """fp32 reference of the recurrence in fla's key-major convention (CPU fallback)."""
  r, k, v, w_log = (x.float() for x in (r, k, v, w_log))
  s, ys = s0_BxHxKxV, []
  for t in range(r.shape[1]):
    kv = k[:, t, :, :, None] * v[:, t, :, None, :]
    ys.append(torch.einsum('bhk,bhkv->bhv', r[:, t], s + u.float()[None, :, :, None] * kv))
    s = s * torch.exp(w_log[:, t])[..., None] + kv
  return torch.stack(ys, 1)


def wkv(r, k, v, w_log, u, state_HxVxK):
  """y [B, T, H, V] from the shared state, expanded over the batch like RWKV-PEFT's fla path."""
  B = r.shape[0]
  s0 = state_HxVxK.transpose(1, 2).unsqueeze(0).expand(B, -1, -1, -1)
  if r.is_cuda:
    from fla.ops.rwkv6 import chunk_rwkv6  # pylint: disable=g-import-not-at-top
    y, _ = chunk_rwkv6(r, k, v, w_log, u, scale=1.0, initial_state=s0, output_final_state=False)
    return y
  return wkv_loop(r, k, v, w_log, u, s0)


def shift(x):
  return F.pad(x, (0, 0, 1, -1))


def time_mix(p, x, state, cfg):
  B, T, C = x.shape
  H, N = cfg.n_head, cfg.head_size
  xx = shift(x) - x
  xxx = x + xx * p['time_maa_x']
  m = torch.tanh(xxx @ p['time_maa_w1']).view(B * T, 5, -1).transpose(0, 1)
  mw, mk, mv, mr, mg = torch.bmm(m, p['time_maa_w2']).view(5, B, T, C).unbind(0)
  xw, xk, xv = x + xx * (p['time_maa_w'] + mw), x + xx * (p['time_maa_k'] + mk), x + xx * (p['time_maa_v'] + mv)
  xr, xg = x + xx * (p['time_maa_r'] + mr), x + xx * (p['time_maa_g'] + mg)
  heads = lambda y: y.view(B, T, H, N)
  r, k, v = heads(F.linear(xr, p['receptance.weight'])), heads(F.linear(xk, p['key.weight'])), heads(
      F.linear(xv, p['value.weight']))
  g = F.silu(F.linear(xg, p['gate.weight']))
  w = p['time_decay'] + torch.tanh(xw @ p['time_decay_w1']) @ p['time_decay_w2']
  w_log = -torch.exp(heads(w))  # in the weights' dtype (bf16), as RWKV-PEFT computes it
  y = wkv(r, k, v, w_log, p['time_faaaa'], state).reshape(B * T, C).to(x.dtype)
  y = F.group_norm(y, H, p['ln_x.weight'], p['ln_x.bias'], eps=GN_EPS).view(B, T, C)
  return F.linear(y * g, p['output.weight'])


def channel_mix(p, x):
  xx = shift(x) - x
  k = torch.relu(F.linear(x + xx * p['time_maa_k'], p['key.weight'])) ** 2
  return torch.sigmoid(F.linear(x + xx * p['time_maa_r'], p['receptance.weight'])) * F.linear(k, p['value.weight'])


def layer_params(weights, cfg):
  """Per layer: {'att': {...}, 'ffn': {...}, 'ln1': (w, b), 'ln2': (w, b)} with dotted leaf names."""
  layers = []
  for i in range(cfg.n_layer):
    prefix = f'blocks.{i}.'
    get = lambda part: {k[len(prefix + part):]: t for k, t in weights.items() if k.startswith(prefix + part)}
    layers.append({'att': get('att.'), 'ffn': get('ffn.'), 'ln1': get('ln1.'), 'ln2': get('ln2.')})
  return layers


def block(layer, x, state, cfg):
  ln = lambda y, p: F.layer_norm(y, (cfg.n_embd,), p['weight'], p['bias'])
  x = x + time_mix(layer['att'], ln(x, layer['ln1']), state, cfg)
  return x + channel_mix(layer['ffn'], ln(x, layer['ln2']))


class L2Wrap(torch.autograd.Function):
  """Identity on the loss; its backward adds L2WRAP * max_logit / (B*T) at every argmax."""

  @staticmethod
  def forward(ctx, loss, logits):
    ctx.save_for_backward(logits)
    return loss

  @staticmethod
  def backward(ctx, grad_loss):
    (logits,) = ctx.saved_tensors
    max_logit, argmax = logits.max(-1, keepdim=True)
    scale = L2WRAP / (logits.shape[0] * logits.shape[1])
    return grad_loss, torch.zeros_like(logits).scatter_(-1, argmax, max_logit * scale)


def loss_fn(weights, layers, states, cfg, inputs_BxT, targets_BxT, grad_cp):
  ln = lambda y, name: F.layer_norm(y, (cfg.n_embd,), weights[f'{name}.weight'], weights[f'{name}.bias'])
  x = ln(F.embedding(inputs_BxT, weights['emb.weight']), 'blocks.0.ln0')
  for layer, state in zip(layers, states):
    if grad_cp:
      x = checkpoint(block, layer, x, state, cfg, use_reentrant=False)
    else:
      x = block(layer, x, state, cfg)
  logits = F.linear(ln(x, 'ln_out'), weights['head.weight'])
  loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), targets_BxT.reshape(-1))
  return L2Wrap.apply(loss, logits)


def make_step(weights, cfg, grad_cp):
  layers = layer_params(weights, cfg)
  device = weights['emb.weight'].device
  states = [torch.zeros(cfg.state_shape[1:], device=device, requires_grad=True) for _ in range(cfg.n_layer)]
  opt = torch.optim.Adam(states, lr=1e-3, betas=(0.9, 0.99), eps=1e-8)

  def step(inputs_BxT, targets_BxT):
    loss = loss_fn(weights, layers, states, cfg, inputs_BxT, targets_BxT, grad_cp)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(states, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
  return step


def bench(cfg, ctx_len, micro_bsz, grad_cp, steps, warmup, init_decays=False):
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  with torch.no_grad():
    weights = random_weights(cfg, device, torch.bfloat16 if device == 'cuda' else torch.float32, init_decays)
  tokens = torch.randint(0, cfg.vocab_size, (micro_bsz, ctx_len + 1), device=device)
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
  step = make_step(weights, cfg, grad_cp)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  step(inputs, targets)
  sync()
  first_s = time.perf_counter() - t0  # Triton JIT + autotuning happen here
  for _ in range(warmup):
    step(inputs, targets)
  times = []
  for _ in range(steps):
    sync()
    t0 = time.perf_counter()
    loss = step(inputs, targets)
    sync()
    times.append(time.perf_counter() - t0)
  peak = torch.cuda.max_memory_allocated() / 1e9 if device == 'cuda' else None
  return {'step_ms': statistics.median(times) * 1e3, 'peak_gb': peak, 'compile_s': first_s,
          'loss': float(loss), 'wkv': 'fla chunk_rwkv6' if device == 'cuda' else 'torch loop'}


def check_loss(seed=0):
  """Same fp32 weights and nonzero state: our loss_fn vs this file's loss (CPU, tiny)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_x64', False)
  from rwkv_jax import checkpoint as ckpt, model, train  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(synthetic.TINY, vocab_size=1024)
  tensors = synthetic.random_checkpoint(cfg, seed)
  rng = np.random.default_rng(seed)
  state_LxHxVxK = rng.normal(0, 0.5, cfg.state_shape).astype(np.float32)
  tokens = rng.integers(0, cfg.vocab_size, (2, 33))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  init_state = model.zero_state(cfg)._replace(wkv=jax.numpy.asarray(state_LxHxVxK))
  grad_fn = jax.value_and_grad(train.loss_fn)
  ours, grads = grad_fn(init_state, ckpt.params_from_tensors(tensors, cfg), cfg, inputs, targets, 'scan')

  weights = {k: torch.from_numpy(v) for k, v in tensors.items()}
  states = [torch.tensor(s, requires_grad=True) for s in state_LxHxVxK]
  loss = loss_fn(weights, layer_params(weights, cfg), states, cfg, torch.from_numpy(inputs),
                 torch.from_numpy(targets), grad_cp=1)
  loss.backward()
  peer_grad = np.stack([s.grad.numpy() for s in states])
  ours_grad = np.asarray(grads.wkv)
  grad_error = float(np.linalg.norm(peer_grad - ours_grad) / np.linalg.norm(ours_grad))
  loss = float(loss.detach())
  return {'ours': float(ours), 'peer': loss, 'abs_diff': abs(float(ours) - loss),
          'state_grad_rel_error': grad_error}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', help='RWKVConfig fields as JSON')
  p.add_argument('--ctx_len', type=int, default=1024)
  p.add_argument('--micro_bsz', type=int, default=1)
  p.add_argument('--grad_cp', type=int, default=1)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--check_loss', action='store_true')
  p.add_argument('--init_decays', action='store_true', help='see synthetic.random_tensor')
  args = p.parse_args()
  if args.check_loss:
    result = check_loss()
  else:
    cfg = RWKVConfig(**json.loads(args.config))
    result = bench(cfg, args.ctx_len, args.micro_bsz, args.grad_cp, args.steps, args.warmup, args.init_decays)
  print('RESULT ' + json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
