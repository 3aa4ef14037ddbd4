"""The Pallas kernels as triton builds them for a chosen GPU generation, outside XLA.

XLA compiles each Pallas kernel's Triton IR for the GPU it runs on. To see
what another generation gets (registers and spills: `bench/wkv6.py
--registers 80 86 89`) or to run it (`tests/test_wkv6.py` runs the sm_80, 86
and 89 builds on the GPU at hand, their PTX assembled for it), this module
walks a function's jaxpr, lowers each `pallas_call` in it for CUDA as Pallas
does for XLA (capturing the IR through a private JAX hook) and compiles that
with the installed triton. `run_built_for` evaluates the whole function, every
other operation as JAX runs it, so the kernels are called exactly as the real
path calls them. Diagnostics and tests only: training never imports it. Needs
triton (and torch to run a build; with jax 0.11, a GPU to lower for).
"""
import dataclasses
import pathlib
import subprocess
import tempfile

import jax
from jax import lax
from jax._src.pallas.triton import lowering  # private: where Pallas hands XLA the Triton IR
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas


@dataclasses.dataclass(frozen=True)
class Lowered:
  """One pallas_call as Pallas hands it to XLA."""
  name: str
  ir: str  # Triton IR text
  grid: tuple[int, int, int]
  num_warps: int
  num_stages: int


def lower(eqn) -> Lowered:
  """The pallas_call equation `eqn` lowered for CUDA, as Pallas's lowering rule does it."""
  captured = {}
  real = lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, *args, **kwargs):
    result = real(jaxpr, *args, **kwargs)
    captured.update(name=jaxpr.debug_info.func_name, grid=result.grid,
                    ir=result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    call = lambda *args: eqn.primitive.bind(*args, **eqn.params)
    jax.jit(call).trace(*(v.aval for v in eqn.invars)).lower(lowering_platforms=('cuda',))
  finally:
    lowering.lower_jaxpr_to_triton_module = real
  params = eqn.params['compiler_params']  # Pallas's defaults when unset: 4 warps, 3 stages
  return Lowered(captured['name'], captured['ir'], tuple(captured['grid']) + (1,) * (3 - len(captured['grid'])),
                 getattr(params, 'num_warps', None) or 4, getattr(params, 'num_stages', None) or 3)


def kernels(fn, *args) -> list[Lowered]:
  """Every Pallas kernel of jax.jit(fn)(*args), lowered for CUDA, in program order."""
  return [lower(eqn) for eqn in pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)]


def pallas_calls(jaxpr):
  """The pallas_call equations of jaxpr and of the jaxprs inside it, in program order."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      yield eqn
    for sub in subjaxprs(eqn):
      yield from pallas_calls(sub)


def subjaxprs(eqn):
  """The jaxprs among eqn's parameters (a jit's body, a loop's, a pallas_call's kernel excluded)."""
  if eqn.primitive.name == 'pallas_call':
    return []
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jex.Jaxpr):
        found.append(item)
  return found


def build(kernel: Lowered, build_sm, run_sm):
  """(triton CompiledKernel, `ptxas -v` log): the kernel's IR compiled with its warps and stages
  for sm_<build_sm>, its PTX assembled for sm_<run_sm>."""
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / f'{kernel.name}.ttir').write_text(kernel.ir)
    compiled = triton.compile(str(tmp / f'{kernel.name}.ttir'), target=GPUTarget('cuda', build_sm, 32),
                              options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages))
    (tmp / f'{kernel.name}.ptx').write_text(compiled.asm['ptx'])
    arch = f'sm_{run_sm}a' if run_sm in (90, 100) else f'sm_{run_sm}'
    log = subprocess.run([get_ptxas(run_sm).path, '-v', f'--gpu-name={arch}', str(tmp / f'{kernel.name}.ptx'),
                          '-o', str(tmp / f'{kernel.name}.cubin')], capture_output=True, text=True, check=True).stderr
    compiled.kernel = (tmp / f'{kernel.name}.cubin').read_bytes()  # the binary CompiledKernel loads at its first launch
  return compiled, log


def run_built_for(build_sm, fn, *args):
  """fn(*args) on this GPU with each of its Pallas kernels as triton builds it for sm_<build_sm>
  (its PTX assembled for this GPU) and everything else as JAX runs it; returns fn's outputs and
  the names of the kernels launched, in order."""
  import torch  # pylint: disable=g-import-not-at-top
  run_sm = int(''.join(map(str, torch.cuda.get_device_capability())))
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  launched = []

  def evaluate(jaxpr, consts, inputs):
    env = {}
    read = lambda var: var.val if isinstance(var, jex.Literal) else env[var]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, inputs))
    for eqn in jaxpr.eqns:
      values = [read(var) for var in eqn.invars]
      if eqn.primitive.name == 'pallas_call':
        kernel = lower(eqn)
        outs = launch(eqn, build(kernel, build_sm, run_sm)[0], kernel.grid, values)
        launched.append(kernel.name)
      elif eqn.primitive.name == 'jit':
        outs = evaluate(eqn.params['jaxpr'].jaxpr, eqn.params['jaxpr'].consts, values)
      elif any(next(pallas_calls(sub), None) for sub in subjaxprs(eqn)):
        raise NotImplementedError(f'a pallas_call inside {eqn.primitive.name}: only jit bodies are walked')
      else:
        outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(var) for var in jaxpr.outvars]

  outs = evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs), launched


def launch(eqn, compiled, grid, inputs):
  """The pallas_call `eqn` on `inputs` (JAX arrays on this GPU) as `compiled`, a triton build of it."""
  import torch  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(inputs)
  # A Pallas Triton kernel takes its inputs, then its outputs; an aliased output is its input's
  # buffer, here a copy (JAX arrays are immutable).
  aliases = dict(eqn.params['input_output_aliases'])
  ins = [to_torch(x).clone() if i in aliases else to_torch(x) for i, x in enumerate(inputs)]
  outs = [None] * len(eqn.outvars)
  for i, o in aliases.items():
    outs[o] = ins[i]
  for o, var in enumerate(eqn.outvars):
    if outs[o] is None:
      outs[o] = torch.empty(var.aval.shape, dtype=getattr(torch, np.dtype(var.aval.dtype).name), device='cuda')
  compiled[grid](*ins, *outs)
  torch.cuda.synchronize()
  return [to_jax(o) for o in outs]


# torch's DLPack import refuses JAX's bf16, so bf16 crosses as its bits (int16) both ways.
def to_torch(x):
  import torch  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(x)  # on the GPU: the jaxpr's constants may be numpy arrays
  if x.dtype == jnp.bfloat16:
    return torch.from_dlpack(lax.bitcast_convert_type(x, jnp.int16)).view(torch.bfloat16)
  return torch.from_dlpack(x)


def to_jax(t):
  import torch  # pylint: disable=g-import-not-at-top
  if t.dtype == torch.bfloat16:
    return lax.bitcast_convert_type(jax.dlpack.from_dlpack(t.view(torch.int16)), jnp.bfloat16)
  return jax.dlpack.from_dlpack(t)
