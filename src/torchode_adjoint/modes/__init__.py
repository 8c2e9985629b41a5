"""Gradient modes: what they share, backprop, the continuous adjoint, the checkpointed and
reversible exact modes.

Internal: the public names are those of ``torchode_adjoint``."""
