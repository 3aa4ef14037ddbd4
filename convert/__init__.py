"""Conversion CLI: `python -m convert {to-flax,to-pth,...} ...`."""
