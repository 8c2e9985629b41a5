"""Model builders for the examples and benchmarks (not imported by ``import torchode_adjoint``)."""
