"""The WKV-6 Pallas kernels as triton builds them for a chosen GPU generation, outside XLA.

XLA compiles each Pallas kernel's Triton IR for the GPU it runs on. To see
what another generation gets (registers and spills: `bench/wkv6.py
--registers 80 86 89`) or to run it (`tests/test_wkv6.py` runs the sm_80, 86
and 89 builds on the GPU at hand, their PTX assembled for it), this module
captures that IR through a private JAX hook and compiles it with the installed
triton. Diagnostics and tests only: training never imports it. Needs triton
(and torch to run a build).
"""
import functools
import pathlib
import subprocess
import tempfile

import jax
from jax._src.pallas.triton import lowering  # private: where Pallas hands XLA the Triton IR
import jax.numpy as jnp
import numpy as np
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas

from pallas_kernels.wkv6_pallas import chunks_per_wide_program, default_config, one_dot_chunks, wkv6_pallas


def triton_ir(fn, *args):
  """{kernel name: Triton IR text} of the Pallas kernels in jax.jit(fn)(*args), lowered for CUDA."""
  ir = {}
  lower = lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, *lower_args, **kwargs):
    result = lower(jaxpr, *lower_args, **kwargs)
    ir[jaxpr.debug_info.func_name] = result.module.operation.get_asm(enable_debug_info=False)
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))
  finally:
    lowering.lower_jaxpr_to_triton_module = lower
  return ir


def build(name, ir_text, build_sm, run_sm, cfg):
  """(triton CompiledKernel, `ptxas -v` log): kernel `name`'s IR compiled with cfg's warps and stages
  for sm_<build_sm>, its PTX assembled for sm_<run_sm>."""
  num_warps = cfg.warps_state if name.startswith('wkv6_state') else cfg.warps_chunk
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / f'{name}.ttir').write_text(ir_text)
    kernel = triton.compile(str(tmp / f'{name}.ttir'), target=GPUTarget('cuda', build_sm, 32),
                            options=dict(num_warps=num_warps, num_stages=cfg.stages))
    (tmp / f'{name}.ptx').write_text(kernel.asm['ptx'])
    arch = f'sm_{run_sm}a' if run_sm in (90, 100) else f'sm_{run_sm}'
    log = subprocess.run([get_ptxas(run_sm).path, '-v', f'--gpu-name={arch}', str(tmp / f'{name}.ptx'),
                          '-o', str(tmp / f'{name}.cubin')], capture_output=True, text=True, check=True).stderr
    kernel.kernel = (tmp / f'{name}.cubin').read_bytes()  # the binary CompiledKernel loads at its first launch
  return kernel, log


def wkv6_built_for(build_sm, r, k, v, w, u_HxK, s0_BxHxVxK, dy, dsT):
  """WKV-6 forward and backward through the kernels as built for sm_<build_sm>, run on this GPU.

  Takes float32 numpy arrays (heads with V = K) and runs r, k, v and dy as
  bf16; returns numpy (y, sT, dr, dk, dv, dw, du, ds0), the kernels called as
  wkv6_pallas's custom VJP calls them. T must need no padding (a multiple of
  the chunk times its state steps).
  """
  import torch  # pylint: disable=g-import-not-at-top
  B, T, H, K = r.shape
  cfg = default_config(B, H)
  L, bv, n = cfg.chunk, min(cfg.block_v, K), T // cfg.chunk
  if T % (L * cfg.state_steps):
    raise ValueError(f'T={T} is not a multiple of {L * cfg.state_steps}')
  bf16_args = [jnp.asarray(x, jnp.bfloat16) for x in (r, k, v)] + [jnp.asarray(x) for x in (w, u_HxK, s0_BxHxVxK)]

  def fwd_bwd(*args):
    out, vjp = jax.vjp(functools.partial(wkv6_pallas, interpret=False, config=cfg), *args)
    return out, vjp((jnp.asarray(dy, jnp.bfloat16), jnp.asarray(dsT)))

  run_sm = int(''.join(map(str, torch.cuda.get_device_capability())))
  built = {name: build(name, text, build_sm, run_sm, cfg)[0]
           for name, text in triton_ir(fwd_bwd, *bf16_args).items()}

  one_dot = torch.from_numpy(np.array(one_dot_chunks(cfg, jnp.asarray(w)))).to('cuda')
  cuda = lambda x, dtype=torch.float32: torch.from_numpy(np.ascontiguousarray(x, np.float32)).to('cuda', dtype)
  r, k, v, dy = (cuda(x, torch.bfloat16) for x in (r, k, v, dy))
  w, u, s0, dsT = cuda(w), cuda(u_HxK.reshape(H, 1, K)), cuda(s0_BxHxVxK), cuda(dsT)
  empty = lambda *shape, dtype=torch.float32: torch.empty(shape, device='cuda', dtype=dtype)
  like_r = lambda: empty(B, T, H, K, dtype=torch.bfloat16)
  state_copies = lambda: empty(B, H, n, K, K, dtype=torch.bfloat16)  # the chunk kernels' copies, bf16 for bf16 inputs
  h, sT, dh, ds0 = state_copies(), empty(B, H, K, K), state_copies(), empty(B, H, K, K)
  y, dv, dr, dk, dw, du_part = like_r(), like_r(), like_r(), like_r(), empty(B, T, H, K), empty(B, n, H, K)
  # Each chunk kernel is two calls: the second (_wide) takes its outputs as aliased inputs too.
  states, chunks = (B, H, K // bv), (n, B, H)
  wide = (n // chunks_per_wide_program(cfg, n, B, H), B, H)
  built['wkv6_state_fwd'][states](k, w, v, s0, h, sT)
  built['wkv6_out_fwd'][chunks](one_dot, r, k, w, u, v, h, y)
  built['wkv6_out_fwd_wide'][wide](one_dot, r, k, w, u, v, h, y, y)
  built['wkv6_state_bwd'][states](r, w, dy, dsT, dh, ds0)
  built['wkv6_dv'][chunks](one_dot, r, k, w, u, dy, dh, dv)
  built['wkv6_dv_wide'][wide](one_dot, r, k, w, u, dy, dh, dv, dv)
  grads = (dr, dk, dw, du_part)
  built['wkv6_dr_dk_dw'][chunks](one_dot, r, k, w, u, v, dy, h, dh, *grads)
  built['wkv6_dr_dk_dw_wide'][wide](one_dot, r, k, w, u, v, dy, h, dh, *grads, *grads)
  return tuple(x.float().cpu().numpy() for x in (y, sT, dr, dk, dv, dw, du_part.sum((0, 1)), ds0))
