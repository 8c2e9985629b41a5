"""Solvers: tableaus and their registry, the method protocol, and the methods (one
Runge--Kutta step for every tableau, the reversible methods).

Internal: the public names are those of ``torchode_adjoint``."""
