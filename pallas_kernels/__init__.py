"""WKV kernels: Pallas GPU kernels with custom VJPs, and their pure-JAX references."""
from pallas_kernels.wkv6 import IMPLEMENTATIONS, wkv6, wkv6_reference

__all__ = ['IMPLEMENTATIONS', 'wkv6', 'wkv6_reference']
