"""Kernels of the C-volution aggregation, each beside the plain-jnp reference it is tested against.

This package knows only jax and numpy; `cvolution_jax.ops.aggregate` is its public entry point.
"""
