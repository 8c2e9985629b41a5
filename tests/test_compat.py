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
