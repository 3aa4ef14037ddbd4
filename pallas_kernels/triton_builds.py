"""The Pallas kernels as Triton builds them for a chosen GPU generation, run through the real code path.

XLA compiles each Pallas kernel's Triton IR for the GPU it runs on. To see
what another generation gets (registers and spills: `bench/wkv6.py
--registers 80 86 89`) or to run it (`tests/test_wkv6.py` runs the sm_80, 86
and 89 builds on the GPU at hand), `built_for` switches Pallas' Triton
lowering, for the calls inside it, to its other path: jaxlib compiles the IR to
PTX itself (with XLA's Triton pipeline, for the generation asked for) and the
launch assembles that PTX for the GPU at hand. What runs inside is the real
code (wkv6_pallas, its custom VJP, its kernel calls and arguments), only built
for another generation.

Private JAX hooks (JAX 0.11: pallas_call_registration.USE_NEW_CUSTOM_CALL,
gpu_info.get_gpu_info, jax._src.lib.triton.compile), so diagnostics and tests
only: training never imports it. Needs a GPU build of jaxlib, and triton for
its ptxas (register reports).
"""
import collections
import contextlib
import functools
import pathlib
import re
import subprocess
import tempfile

import jax
from jax._src.lib import triton as jaxlib_triton  # private: Pallas' Triton-to-PTX compile
from jax._src.pallas.triton import gpu_info  # private: the GPU Pallas lowers for
from jax._src.pallas.triton import pallas_call_registration  # private: which launch path Pallas emits
import jax.numpy as jnp
import numpy as np

from pallas_kernels.wkv6_pallas import wkv6_pallas

Build = collections.namedtuple('Build', 'ptx shared_bytes warps')  # one kernel as jaxlib's Triton compiled it
NOT_BUILT = "Pallas compiled no kernel through jaxlib's Triton compile (this JAX version takes another path)"


@contextlib.contextmanager
def built_for(build_sm, run_sm=None):
  """Within: Pallas Triton kernels are compiled to PTX for sm_<build_sm>, which is assembled for
  sm_<run_sm> (default: this GPU's) when they launch.

  Yields {kernel name: Build}, filled as kernels are compiled (at lowering). JAX's
  caches are cleared on entry and exit, so no executable built outside is run
  inside, nor the other way round.
  """
  if run_sm is None:
    run_sm = gpu_info.get_gpu_info().compute_capability
  target = gpu_info.GpuInfo(gpu_version=None, arch_name=f'{build_sm // 10}.{build_sm % 10}',
                            compute_capability=run_sm)
  builds = {}
  compile_ptx = jaxlib_triton.compile

  def compile_recorded(platform, module, arch_name, **options):
    result = compile_ptx(platform, module, arch_name, **options)
    name = re.search(r'\.entry\s+(\w+)', result.asm).group(1)
    builds[name] = Build(result.asm, result.smem_bytes, options['num_warps'])
    return result

  hooks = ((pallas_call_registration, 'USE_NEW_CUSTOM_CALL', True),
           (gpu_info, 'get_gpu_info', lambda: target),
           (jaxlib_triton, 'compile', compile_recorded))
  saved = [(module, name, getattr(module, name)) for module, name, _ in hooks]
  jax.clear_caches()
  try:
    for module, name, value in hooks:
      setattr(module, name, value)
    yield builds
  finally:
    for module, name, value in saved:
      setattr(module, name, value)
    jax.clear_caches()


def ptxas_logs(fn, args, sm):
  """{kernel name: (Build, `ptxas -v` log)} of the Pallas kernels in jax.jit(fn)(*args) built for
  sm_<sm> (lowered only: nothing runs)."""
  from triton.backends.nvidia.compiler import get_ptxas  # pylint: disable=g-import-not-at-top
  with built_for(sm, run_sm=sm) as builds:
    jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))
  if not builds:
    raise RuntimeError(NOT_BUILT)
  arch = f'sm_{sm}a' if sm in (90, 100) else f'sm_{sm}'
  logs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, build in builds.items():
      ptx = pathlib.Path(tmp) / f'{name}.ptx'
      ptx.write_text(build.ptx)
      log = subprocess.run([get_ptxas(sm).path, '-v', f'--gpu-name={arch}', str(ptx), '-o', f'{ptx}.cubin'],
                           capture_output=True, text=True, check=True).stderr
      logs[name] = (build, log)
  return logs


def wkv6_built_for(build_sm, r, k, v, w, u_HxK, s0_BxHxVxK, dy, dsT):
  """WKV-6 forward and backward, wkv6_pallas's, with its kernels built for sm_<build_sm>, run on this GPU.

  Takes float32 numpy arrays and runs r, k, v and dy as bf16; returns numpy
  float32 (y, sT, dr, dk, dv, dw, du, ds0).
  """
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  args = (bf16(r), bf16(k), bf16(v), jnp.asarray(w), jnp.asarray(u_HxK), jnp.asarray(s0_BxHxVxK))
  with built_for(build_sm) as builds:
    (y, sT), vjp = jax.vjp(functools.partial(wkv6_pallas, interpret=False), *args)
    outs = jax.block_until_ready((y, sT) + vjp((bf16(dy), jnp.asarray(dsT))))
  if not builds:
    raise RuntimeError(NOT_BUILT)
  return tuple(np.asarray(x.astype(jnp.float32)) for x in outs)
