"""What the dynamics read besides their inputs, and the check that it is unchanged at backward.

A memory-saving mode evaluates the dynamics again in its backward pass, with whatever the
tensors they read hold *then*. A tensor outside the state and the time (a parameter, a buffer, a
noise vector kept on the module, a tensor captured by a closure) that is rebound or modified in
place between a solve and its backward would make the backward pass differentiate other dynamics
than the forward pass solved, silently. Backprop keeps what it read in its graph and has no such
hole; here the modes record what the dynamics read and refuse to compute with anything changed.

How it works, once per solve:

1. The first evaluation of the forward pass runs under :class:`ReadRecorder`, a
   ``torch.overrides.TorchFunctionMode`` that follows the data flow of that one call: every tensor
   an operation produces depends on the outside tensors its inputs depend on; a tensor that is
   neither the state, nor the time, nor produced in the call is an outside tensor. The outside
   tensors that the output ``dy/dt`` depends on, or whose values reach the host (``.item()``,
   ``if x > 0``), are what the dynamics *read*. Tensors only written (a counter the dynamics
   increment, a cache they fill) are not reads, and neither is the shape of a tensor.
2. :func:`locate` finds each read tensor's place from the dynamics object: an attribute path
   through modules and plain objects, a closure variable, a global, an item of a list or dict.
3. :meth:`Reads.check`, first thing in the backward pass, raises if a read tensor was modified in
   place (its version counter moved) or if its place now holds another object (it was rebound),
   naming the tensor, what changed and the fixes.

What it cannot see (documented on the gradient-modes page): reads that only later evaluations
make (a branch on ``t``), Python numbers and other non-tensor state, and the rebinding of a tensor
found at no place within :data:`_MAX_DEPTH` steps (its in-place changes are still seen). A change
undone before the backward pass passes when it was a rebinding (the same object is back) and is
reported when it was in place (version counters only grow; the library keeps no copy of the
values to compare).
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ReadRecorder", "Reads", "OutsideRead", "locate", "reachable_modules", "version_of"]

# How many steps from the dynamics object a tensor's place is looked for (module -> submodule ->
# attribute is three): deep enough for a tensor two plain objects below a closure or module.
_MAX_DEPTH = 5
# How many objects the search visits at most (a module tree with thousands of submodules stops
# here; the tensors not found keep their in-place check).
_MAX_VISITS = 20_000
# Containers longer than this are not searched: a function's global data set (a list of
# thousands of tensors) would otherwise cost every solve a walk, for the training-mode
# normalisation layers as for the places of read tensors (their in-place changes stay checked).
_MAX_ITEMS = 256

# Functions whose result does not depend on the *values* of their tensor inputs: reading a
# tensor's shape, dtype or device is not a read of it, and a new tensor "like" another holds none
# of its values. Names, since properties and methods arrive as their getters and functions.
_NOT_READS = frozenset(
    {
        "shape", "size", "dim", "ndim", "ndimension", "numel", "nelement", "dtype", "device",
        "layout", "requires_grad", "is_leaf", "grad_fn", "is_cuda", "is_complex",
        "is_floating_point", "is_contiguous", "stride", "storage_offset", "element_size",
        "__len__", "_version", "data_ptr", "names", "is_inference", "is_sparse", "is_quantized",
        "is_meta", "is_nested", "itemsize", "nbytes", "get_device",
        "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
        "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
    }
)  # fmt: skip


def version_of(x: torch.Tensor) -> int | None:
    """``x``'s version counter (bumped by every in-place change), None for an inference tensor
    (which has none)."""
    return None if x.is_inference() else x._version


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``x``: a tensor, or (nested) tuples, lists and dicts of them."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


class ReadRecorder(TorchFunctionMode):
    """Follows one call of the dynamics: which outside tensors its output depends on.

    Parameters
    ----------
    inputs : tensors
        The call's own inputs (the state and the time): not outside tensors.

    Attributes
    ----------
    outside : dict of int to Tensor
        Every outside tensor an operation of the call took, by ``id`` (strong references, for
        the duration of the call: ids stay unique while the recorder lives).
    """

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        # id(tensor) -> the ids of the outside tensors its values depend on
        self._depends: dict[int, frozenset[int]] = {id(x): frozenset() for x in inputs}
        self._inputs = inputs
        self._made: list[torch.Tensor] = []  # tensors of the call, kept so their ids stay unique
        self._host: set[int] = set()  # outside tensors whose values reached the host
        self.outside: dict[int, torch.Tensor] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property's getter: Tensor.shape.__get__ and the like
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        depends: frozenset[int] = frozenset()
        for x in _tensors((args, kwargs)):
            known = self._depends.get(id(x))
            if known is None:
                self.outside[id(x)] = x
                known = self._depends[id(x)] = frozenset((id(x),))
            depends |= known
        if name in _NOT_READS:
            depends = frozenset()
        produced = list(_tensors(out))
        if produced:
            for y in produced:
                # An in-place op returns its input: what it held and what was written in.
                self._depends[id(y)] = self._depends.get(id(y), frozenset()) | depends
                self._made.append(y)
        elif name == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            target = args[0]
            self._depends[id(target)] = self._depends.get(id(target), frozenset()) | depends
        elif out is not None:
            self._host |= depends  # a number, a bool, a list: the values left the graph
        return out

    def read_by(self, output: Any) -> list[torch.Tensor]:
        """The outside tensors ``output`` depends on or whose values reached the host, in the
        order the call first took them."""
        ids = set(self._host)
        for y in _tensors(output):
            known = self._depends.get(id(y))
            if known is None:  # returned as it is, through no operation: an outside tensor
                self.outside.setdefault(id(y), y)
                known = frozenset((id(y),))
            ids |= known
        return [x for i, x in self.outside.items() if i in ids]


# ----------------------------------------------------------------------------------------------
# Where a tensor is: a path of steps from the dynamics object.


@dataclass(frozen=True)
class _Step:
    """One step from an object to another: ``kind`` is "attr", "item", "cell", "global" or
    "self"; ``key`` the attribute name, item key, closure-cell index or global name."""

    kind: str
    key: Any
    label: str = ""  # a closure cell's variable name


def _children(obj: Any) -> Iterator[tuple[_Step, Any]]:
    """The objects one step from ``obj`` that a dynamics object commonly reaches tensors by."""
    if isinstance(obj, torch.nn.Module):
        for name, p in obj._parameters.items():
            if p is not None:
                yield _Step("attr", name), p
        for name, b in obj._buffers.items():
            if b is not None:
                yield _Step("attr", name), b
        for name, m in obj._modules.items():
            if m is not None:
                yield _Step("attr", name), m
        for name, v in vars(obj).items():
            if not name.startswith("_") and name != "training":
                yield _Step("attr", name), v
    elif isinstance(obj, types.FunctionType):
        code = obj.__code__
        for i, (name, cell) in enumerate(zip(code.co_freevars, obj.__closure__ or ())):
            try:
                yield _Step("cell", i, name), cell.cell_contents
            except ValueError:  # an empty cell (a variable not yet assigned)
                continue
        for name in code.co_names:
            if name in obj.__globals__:
                yield _Step("global", name), obj.__globals__[name]
    elif isinstance(obj, types.MethodType):
        yield _Step("self", None), obj.__self__
        yield _Step("attr", "__func__"), obj.__func__
    elif isinstance(obj, functools.partial):
        yield _Step("attr", "func"), obj.func
        for i, v in enumerate(obj.args):
            yield _Step("partial", i), v
        for k, v in obj.keywords.items():
            yield _Step("partial", k), v
    elif isinstance(obj, (tuple, list)) and len(obj) <= _MAX_ITEMS:
        for i, v in enumerate(obj):
            yield _Step("item", i), v
    elif isinstance(obj, dict) and len(obj) <= _MAX_ITEMS:
        for k, v in obj.items():
            yield _Step("item", k), v
    elif not isinstance(obj, (type, types.ModuleType, str, bytes, int, float, complex, bool)):
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            for name, v in attrs.items():
                if not name.startswith("__"):
                    yield _Step("attr", name), v
        if callable(obj):
            call = vars(type(obj)).get("__call__")  # defined by the object's own class
            if isinstance(call, types.FunctionType):  # a callable object: what its call reads
                yield _Step("method", "__call__"), call


def _follow(obj: Any, step: _Step) -> Any:
    """The object one ``step`` from ``obj`` now (raises LookupError if it no longer exists)."""
    try:
        if step.kind == "attr":
            return getattr(obj, step.key)
        if step.kind == "item":
            return obj[step.key]
        if step.kind == "cell":
            return obj.__closure__[step.key].cell_contents
        if step.kind == "global":
            return obj.__globals__[step.key]
        if step.kind == "self":
            return obj.__self__
        if step.kind == "partial":
            return obj.args[step.key] if isinstance(step.key, int) else obj.keywords[step.key]
        if step.kind == "method":
            return getattr(type(obj), step.key)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise LookupError(str(err)) from err
    raise LookupError(step.kind)


def _render(root: Any, path: tuple[_Step, ...]) -> str:
    """A path as the user would write it: ```CNF.e```, ```noise``` (captured by ``f``), ..."""
    if isinstance(root, torch.nn.Module):
        text = type(root).__name__
    else:
        text = getattr(root, "__name__", type(root).__name__)
    note = ""
    for step in path:
        if step.kind in ("attr", "method"):
            text += f".{step.key}"
        elif step.kind in ("item", "partial"):
            text += f"[{step.key!r}]"
        elif step.kind in ("cell", "global"):
            kind = "a variable captured by" if step.kind == "cell" else "a global read by"
            note = f" ({kind} `{text}`)"
            text = step.label if step.kind == "cell" else step.key
        elif step.kind == "self":
            text += ".__self__"
    return f"`{text}`{note}"


def locate(root: Any, tensors: list[torch.Tensor]) -> dict[int, tuple[_Step, ...]]:
    """A path from ``root`` to each of ``tensors`` that can be found (breadth first, so the
    shortest), by ``id``."""
    wanted = {id(x) for x in tensors}
    found: dict[int, tuple[_Step, ...]] = {}
    seen = {id(root)}
    level: list[tuple[Any, tuple[_Step, ...]]] = [(root, ())]
    visits = 0
    for _ in range(_MAX_DEPTH):
        following: list[tuple[Any, tuple[_Step, ...]]] = []
        for obj, path in level:
            for step, child in _children(obj):
                visits += 1
                if isinstance(child, torch.Tensor):
                    if id(child) in wanted and id(child) not in found:
                        found[id(child)] = (*path, step)
                        if len(found) == len(wanted):
                            return found
                elif id(child) not in seen:
                    seen.add(id(child))
                    following.append((child, (*path, step)))
            if visits > _MAX_VISITS:
                return found
        level = following
    return found


def reachable_modules(root: Any) -> list[torch.nn.Module]:
    """The modules ``root`` reaches: itself if it is one (its submodules are its own), else the
    modules found from it as :func:`locate` searches (a closure or a global over a module)."""
    if isinstance(root, torch.nn.Module):
        return [root]
    found: list[torch.nn.Module] = []
    seen = {id(root)}
    level = [root]
    visits = 0
    for _ in range(_MAX_DEPTH):
        following = []
        for obj in level:
            for _step, child in _children(obj):
                visits += 1
                if visits > _MAX_VISITS:
                    return found
                if id(child) in seen or isinstance(child, torch.Tensor):
                    continue
                seen.add(id(child))
                if isinstance(child, torch.nn.Module):
                    found.append(child)
                else:
                    following.append(child)
        level = following
    return found


# ----------------------------------------------------------------------------------------------
# The record kept from the forward pass, and the check at the backward pass.


@dataclass(frozen=True)
class OutsideRead:
    """One tensor the dynamics read: a weak reference (the record keeps nothing alive), its
    version after the first evaluation and at the end of the forward pass, and its place."""

    ref: weakref.ref[torch.Tensor]
    version: int | None  # None for an inference tensor, which has no version counter
    version_after_forward: int | None
    path: tuple[_Step, ...] | None
    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self, root: Any) -> str:
        if self.path is not None:
            return f"{_render(root, self.path)} (shape {self.shape}, {self.dtype})"
        return f"a tensor of shape {self.shape} and dtype {self.dtype}"

    def change(self, root: Any) -> str | None:
        """What changed since the first evaluation, or None."""
        tensor = self.ref()
        if self.path is not None:
            now: Any = root
            try:
                for step in self.path:
                    now = _follow(now, step)
            except LookupError:
                return "was removed from its place after the solve"
            if now is not tensor:
                return "was rebound to another tensor after the solve"
        if tensor is None:
            return None  # unreachable now: nothing can read it
        if self.version is None:
            return None
        if self.version_after_forward != self.version:
            return (
                "was modified in place during the solve (the dynamics, or code they call, "
                "write a tensor they read)"
            )
        if version_of(tensor) != self.version:
            return "was modified in place after the solve"
        return None


@dataclass(frozen=True)
class Reads:
    """The outside tensors a solve's dynamics read, for :meth:`check` at the backward pass."""

    root: Any
    items: tuple[OutsideRead, ...]

    @staticmethod
    def record(root: Any, read: list[torch.Tensor], versions: list[int | None]) -> Reads:
        """The record of ``read`` (with their versions after the first evaluation), taken at
        the end of the forward pass."""
        paths = locate(root, read) if read else {}
        items = tuple(
            OutsideRead(
                ref=weakref.ref(x),
                version=v,
                version_after_forward=version_of(x),
                path=paths.get(id(x)),
                shape=tuple(x.shape),
                dtype=x.dtype,
            )
            for x, v in zip(read, versions)
        )
        return Reads(root, items)

    def check(self, mode: str) -> None:
        """Raise a RuntimeError naming the first read tensor that changed since the forward
        pass, what changed and the fixes."""
        for item in self.items:
            change = item.change(self.root)
            if change is None:
                continue
            raise RuntimeError(
                f"adjoint={mode!r} evaluates the dynamics again in the backward pass, and a "
                f"tensor they read besides the state and the time, {item.describe(self.root)}, "
                f"{change}: the backward pass would differentiate other dynamics than the ones "
                "solved, and the gradient would be silently wrong. Keep it fixed until "
                "`backward()` (one solve per backward, or set it again before backward as it "
                "was), pass it in the state (a part whose derivative is zero) or as an input of "
                "the dynamics, or use adjoint='backprop', which keeps what the forward pass read."
            )
