"""cvolution-jax: C-volution, involution and the CedNet / RedNet / ResNet family in JAX and Flax."""

__version__ = "0.1.0"
