"""Private PyTorch APIs are touched in one module only, so a new torch release breaks one place."""

from __future__ import annotations

import re
from pathlib import Path

import torchode_adjoint

PACKAGE = Path(torchode_adjoint.__file__).parent
# A dotted name from torch with a private component: torch._C, torch._foreach_add_,
# torch.profiler._memory_profiler, ... (not torch.__version__).
PRIVATE = re.compile(r"\b(?:torch|nn)(?:\.[A-Za-z]\w*)*\._(?!_)\w+")


def test_only_the_compatibility_module_calls_private_torch_apis() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "private torch APIs outside _compat.py:\n" + "\n".join(offenders)


def test_the_check_sees_a_private_call() -> None:
    assert PRIVATE.search("x = torch._C._are_functorch_transforms_active()")
    assert PRIVATE.search("torch._foreach_add_(a, b)")
    assert PRIVATE.search("from torch.profiler._memory_profiler import Action")
    assert PRIVATE.search("prof = torch.autograd._functions")
    assert PRIVATE.search("isinstance(m, nn.modules.batchnorm._BatchNorm)")
    assert not PRIVATE.search("torch.__version__")
    assert not PRIVATE.search("self._module.weight")


def _graph(dtype=None):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    out = torch.tanh(x @ w)
    v = torch.randn(3, 4, generator=g, dtype=dtype or torch.float64)
    return out, [x, w, unused], v


def test_the_vector_jacobian_product_equals_autograds_on_the_fast_path() -> None:
    import torch

    from torchode_adjoint._compat import vector_jacobian_product

    out, inputs, v = _graph()
    got = vector_jacobian_product(out, inputs, v)
    out, inputs, v = _graph()
    ref = torch.autograd.grad(out, inputs, v, allow_unused=True)
    assert got[2] is None and ref[2] is None  # an unused input: None, as allow_unused gives
    for a, b in zip(got[:2], ref[:2]):
        assert torch.equal(a, b)


def test_the_vector_jacobian_product_falls_back_to_autograds_checks() -> None:
    import pytest
    import torch

    from torchode_adjoint._compat import vector_jacobian_product

    out, inputs, v = _graph(dtype=torch.float32)  # another dtype: autograd's own handling
    got = vector_jacobian_product(out, inputs, v)
    out, inputs, v = _graph(dtype=torch.float32)
    ref = torch.autograd.grad(out, inputs, v, allow_unused=True)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(got, ref))
    x = torch.ones(2, requires_grad=True)  # a leaf output (the identity dynamics): no grad_fn
    (g,) = vector_jacobian_product(x, [x], torch.full((2,), 3.0))
    assert torch.equal(g, torch.full((2,), 3.0))
    with pytest.raises(RuntimeError, match="does not require grad"):
        vector_jacobian_product(torch.ones(2), [x], torch.ones(2))
