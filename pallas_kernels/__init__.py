"""WKV kernels: Pallas GPU kernels with custom VJPs, and their pure-JAX references."""
from pallas_kernels.common import IMPLEMENTATIONS
from pallas_kernels.wkv6 import wkv6, wkv6_reference
from pallas_kernels.wkv7 import wkv7, wkv7_reference

__all__ = ['IMPLEMENTATIONS', 'wkv6', 'wkv6_reference', 'wkv7', 'wkv7_reference']
