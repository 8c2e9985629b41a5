"""Step controllers: fixed layouts of steps (equal, given, recorded) and error control.

Internal: the public names are those of ``torchode_adjoint``."""
