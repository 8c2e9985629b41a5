"""States that are not one real tensor: tuples, lists and dicts of tensors, and complex dtypes.

Such a state is integrated as one flat real vector, the way torchdiffeq integrates a tuple
state: at the boundary (:func:`~torchode_adjoint._prepare.prepare`) the leaves are flattened and
concatenated, complex leaves as their real and imaginary parts (``torch.view_as_real``); the
dynamics are wrapped so that they receive the user's structure (views of the flat vector, no
copy) and return it (one concatenation, the copy the user's own concatenation would make). Every
gradient mode, the compiled path, the checks and the counters then see one real tensor and need
nothing else; the solution is split back into the structure at the end.

Autograd through the views gives PyTorch's convention for complex gradients (the conjugate
Wirtinger derivative) in every mode, because each mode differentiates the real vector exactly
as it would a real state. A single real tensor never enters this module's wrappers (no flatten
on that path).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "StateStructure",
    "StructuredDynamics",
    "first_leaf",
    "map_leaves",
    "real_dtype",
    "non_finite_part",
]

#: Structures kept for reuse; beyond this many the table starts over.
_MAX_INTERNED = 256

State = torch.Tensor | Sequence["State"] | Mapping[Any, "State"]


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of one part of ``dtype`` (``complex64 -> float32``; real unchanged)."""
    return dtype.to_real() if dtype.is_complex else dtype


@dataclass(frozen=True)
class _Leaf:
    """One tensor of the state: where it is in the structure and in the flat vector."""

    path: str  # e.g. "['v']" or "[1][0]"; "" for a state that is one (complex) tensor
    shape: torch.Size
    dtype: torch.dtype
    offset: int  # first element in the flat real vector
    size: int  # elements in the flat real vector (twice the numel for a complex leaf)


@dataclass(frozen=True)
class _Node:
    """A container of the state: its type, its keys (dict keys or indices) and children. A
    child that is None is a leaf (taken from the leaves in order)."""

    kind: type
    keys: tuple[Any, ...]
    children: tuple[_Node | None, ...]


def _new_container(kind: Any, keys: tuple[Any, ...], values: list[Any]) -> Any:
    if issubclass(kind, dict):
        return kind(zip(keys, values))
    if issubclass(kind, tuple) and hasattr(kind, "_fields"):  # a namedtuple
        return kind(*values)
    return kind(values)


class StateStructure:
    """How a structured or complex state maps onto one flat real vector, and back.

    Build one with :meth:`of`; equal structures (same containers, keys, shapes and dtypes) are
    the same object, so that a compiled step guards on it by identity.
    """

    __slots__ = (
        "root",
        "leaves",
        "dtype",
        "device",
        "batch",
        "size",
        "padded",
        "_chunks",
        "_views",
        "_parts",
        "_flat_kind",
        "__weakref__",
    )

    root: _Node | None  # None: the state is one (complex) tensor
    leaves: tuple[_Leaf, ...]
    dtype: torch.dtype  # the real dtype of the flat vector
    device: torch.device
    batch: tuple[int, ...]  # (B,) when every part has the first dimension B, else ()
    size: int  # the flat state's last dimension: its shape is (*batch, size)

    _interned: dict[tuple[Any, ...], StateStructure] = {}

    @classmethod
    def of(cls, y0: object) -> StateStructure | None:
        """The structure of ``y0``, or None for one real floating-point tensor (integrated as it
        is). Raises for a leaf that is not a tensor, mixed precisions or devices, with the leaf
        named."""
        if isinstance(y0, torch.Tensor) and not y0.is_complex():
            return None
        leaves: list[tuple[str, torch.Tensor]] = []
        root = _walk(y0, "", leaves)
        if not leaves:
            raise ValueError(
                f"`y0` holds no tensor (an empty {type(y0).__name__}); pass at least one tensor."
            )
        first_path, first = leaves[0]
        dtype = real_dtype(first.dtype)
        for path, leaf in leaves:
            if real_dtype(leaf.dtype) != dtype:
                raise TypeError(
                    f"`y0{path}` has dtype {leaf.dtype}, and `y0{first_path}` has {first.dtype}: "
                    "the parts of a state share one precision (float32 with complex64, float64 "
                    f"with complex128); cast it, e.g. `.to({_same_precision(leaf.dtype, dtype)})`."
                )
            if leaf.device != first.device:
                raise ValueError(
                    f"`y0{path}` is on {leaf.device}, and `y0{first_path}` on {first.device}: the "
                    f"parts of a state share one device; move it with `.to({str(first.device)!r})`."
                )
        key = (root, tuple((p, x.shape, x.dtype) for p, x in leaves), first.device)
        found = cls._interned.get(key)
        if found is not None:
            return found
        self = object.__new__(cls)
        self.root, self.dtype, self.device = root, dtype, first.device
        # Parts that share a first (batch) dimension are laid out side by side in rows, as a
        # user's own concatenation along dim 1 would be: (B, size). Otherwise one flat vector.
        b = first.shape[0] if first.dim() >= 1 else 0
        batched = b > 0 and all(x.dim() >= 1 and x.shape[0] == b for _, x in leaves)
        self.batch = (b,) if batched else ()
        placed, offset = [], 0
        for path, x in leaves:
            numel = x.numel() // b if batched else x.numel()
            if x.is_complex():
                offset += offset % 2  # view_as_complex needs an even offset: one padding slot
                size = 2 * numel
            else:
                size = numel
            placed.append(_Leaf(path, x.shape, x.dtype, offset, size))
            offset += size
        if any(x.is_complex() for _, x in leaves):
            offset += offset % 2  # and an even row length, for the rows' strides
        self.leaves, self.size = tuple(placed), offset
        self._plan()
        if len(cls._interned) >= _MAX_INTERNED:  # many shapes (varying batch sizes): start over
            cls._interned.clear()
        cls._interned[key] = self
        return self

    def _plan(self) -> None:
        """Precompute what the per-evaluation paths need: the chunks of the flat state's last
        dimension (a padding slot is a chunk of its own), each leaf's chunk and view shape
        (without the batch dimension), and for a flat container (a tuple, list or dict of
        tensors) its kind, for the fast paths."""
        chunks: list[int] = []
        views: list[tuple[int, tuple[int, ...] | None, bool]] = []
        position, skip = 0, len(self.batch)
        for leaf in self.leaves:
            if leaf.offset != position:
                chunks.append(leaf.offset - position)
            complex_ = leaf.dtype.is_complex
            rest = tuple(leaf.shape[skip:])
            # None: the chunk is the part already (a real part with one dimension per row)
            shape = (*rest, 2) if complex_ else (None if len(rest) == 1 else rest)
            views.append((len(chunks), shape, complex_))
            chunks.append(leaf.size)
            position = leaf.offset + leaf.size
        if position != self.size:
            chunks.append(self.size - position)
        self._chunks, self._views = chunks, views
        # Per leaf, the row shape to reshape it to in `flatten`, or None where it already is one
        # (a real part of shape (B, n) in the batched layout, or of shape (n,) in the other).
        row = (*self.batch, -1)
        self._parts = [
            (leaf, None if shape is None else row)
            for leaf, (_, shape, _complex) in zip(self.leaves, views)
        ]
        self.padded = len(chunks) != len(self.leaves)
        root = self.root
        flat = root is not None and all(child is None for child in root.children)
        self._flat_kind = root.kind if flat and root is not None else None

    def flatten(self, state: State, what: str = "y0") -> torch.Tensor:
        """The flat real state of ``state`` (which must have this structure; ``what`` names it
        in errors). Differentiable; padding slots are zeros."""
        kind = self._flat_kind
        if (kind is tuple or kind is list) and type(state) in (tuple, list):
            tensors: Sequence[Any] = state  # type: ignore[assignment]
            if len(tensors) != len(self.leaves):
                tensors = _leaves_of(state, self.root, what)
        elif kind is dict and type(state) is dict and len(state) == len(self.leaves):
            try:
                tensors = [state[k] for k in self.root.keys]  # type: ignore[union-attr]
            except KeyError:
                tensors = _leaves_of(state, self.root, what)
        else:
            tensors = _leaves_of(state, self.root, what)
        parts = []
        for (leaf, row), x in zip(self._parts, tensors):
            if type(x) is not torch.Tensor or x.shape != leaf.shape or x.dtype != leaf.dtype:
                x = self._conform(leaf, x, what)
            if row is not None:  # complex, or not (batch, features): a view (or a copy) in rows
                if x.is_complex():
                    x = torch.view_as_real(x.resolve_conj())
                x = x.reshape(row)
            parts.append(x)
        if self.padded:
            parts = self._padded(parts)
        elif len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=-1)

    def _conform(self, leaf: _Leaf, x: object, what: str) -> torch.Tensor:
        """``x`` as the part ``leaf`` of a state, or an error naming the part. Under autocast a
        derivative in another floating dtype is cast to the state's (the state keeps its
        dtype)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{_name(what, leaf)} must be a Tensor, got {type(x).__name__}; return a "
                f"tensor of shape {tuple(leaf.shape)} for this part of the state."
            )
        if x.shape != leaf.shape:
            raise ValueError(
                f"{_name(what, leaf)} must have the state's shape {tuple(leaf.shape)} for this "
                f"part, got {tuple(x.shape)}."
            )
        if x.dtype == leaf.dtype:  # a tensor subclass (a Parameter, say) of the right kind
            return x
        autocast = torch.is_autocast_enabled(self.device.type)
        if not autocast or x.is_complex() != leaf.dtype.is_complex:
            raise TypeError(
                f"{_name(what, leaf)} must have the state's dtype {leaf.dtype} for this "
                f"part, got {x.dtype}; cast it, e.g. `.to({leaf.dtype})`."
            )
        return x.to(leaf.dtype)

    def _padded(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        out, position = [], 0
        for leaf, part in zip(self.leaves, parts):
            if leaf.offset != position:
                out.append(part.new_zeros(*self.batch, leaf.offset - position))
            out.append(part)
            position = leaf.offset + leaf.size
        if position != self.size:
            out.append(parts[-1].new_zeros(*self.batch, self.size - position))
        return out

    def unflatten(self, flat: torch.Tensor) -> State:
        """The structure over a flat state (shape ``(*batch, size)``), or over a stack of them
        (``(T, *batch, size)``: the leaves get the leading dimension). The leaves are views."""
        lead = flat.shape[:-1]
        chunks = flat.split_with_sizes(self._chunks, dim=-1)
        tensors = [
            chunks[i]
            if shape is None
            # A tuple, not unpacked arguments: `view()` with no size (a 0-dim part of an
            # unbatched state) is not a valid call.
            else torch.view_as_complex(chunks[i].view((*lead, *shape)))
            if complex_
            else chunks[i].view((*lead, *shape))
            for i, shape, complex_ in self._views
        ]
        kind = self._flat_kind
        if kind is tuple:
            return tuple(tensors)
        if kind is list:
            return tensors
        if self.root is None:
            return tensors[0]
        return _build(self.root, iter(tensors))

    def parts(self) -> tuple[tuple[int, int], ...]:
        """Each tensor's offset and size in the flat state's last dimension (padding left out)."""
        return tuple((leaf.offset, leaf.size) for leaf in self.leaves)

    def per_part(self, value: object, what: str) -> list[Any]:
        """The values of ``value``, a container shaped like the state (numbers where the state
        has tensors), in the order of :meth:`parts`; raises naming ``what`` where its
        containers or keys differ from the state's."""
        return _leaves_of(value, self.root, what)

    def describe(self, flat: torch.Tensor) -> str:
        """The first part of the state (``"y['v']"``) where ``flat`` is not finite, or ``""``."""
        for leaf in self.leaves:
            part = flat[..., leaf.offset : leaf.offset + leaf.size]
            if not bool(torch.isfinite(part).all()):
                return f"y{leaf.path}" if leaf.path else "y"
        return ""

    def wrap(self, func: Callable[..., Any]) -> StructuredDynamics:
        """``func`` (taking and returning this structure) as dynamics of the flat vector."""
        return StructuredDynamics(func, self)

    def __repr__(self) -> str:
        parts = ", ".join(f"y{leaf.path}: {tuple(leaf.shape)} {leaf.dtype}" for leaf in self.leaves)
        return f"StateStructure({parts})"


def _name(what: str, leaf: _Leaf) -> str:
    return f"`{what}{leaf.path}`"


def _same_precision(dtype: torch.dtype, real: torch.dtype) -> torch.dtype:
    if not dtype.is_complex:
        return real
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(
        real, torch.complex64
    )


def _walk(x: object, path: str, leaves: list[tuple[str, torch.Tensor]]) -> _Node | None:
    """The structure of ``x`` (None for a tensor), appending its leaves with their paths."""
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()) or x.dtype == torch.complex32:
            raise TypeError(
                f"`y0{path}` must be a floating-point or complex tensor, got dtype {x.dtype}; "
                "cast it, e.g. `.double()` or `.to(torch.complex128)`."
            )
        leaves.append((path, x))
        return None
    if isinstance(x, Mapping):
        keys = tuple(x.keys())
        children = tuple(_walk(x[k], f"{path}[{k!r}]", leaves) for k in keys)
        return _Node(type(x) if isinstance(x, dict) else dict, keys, children)
    if isinstance(x, (tuple, list)):
        if x and all(isinstance(v, numbers.Number) for v in x):
            where = f"`y0{path}`" if path else "`y0`"
            raise TypeError(
                f"{where} must be a tensor or a tuple, list or dict of tensors, got a "
                f"{type(x).__name__} of numbers; wrap it with "
                "`torch.as_tensor(y0, dtype=torch.float32)`."
            )
        children = tuple(_walk(v, f"{path}[{i}]", leaves) for i, v in enumerate(x))
        return _Node(type(x), tuple(range(len(x))), children)
    where = f"`y0{path}`" if path else "`y0`"
    raise TypeError(
        f"{where} must be a tensor or a tuple, list or dict of tensors, got "
        f"{type(x).__name__}; wrap numbers with `torch.as_tensor(x, dtype=torch.float32)`."
    )


def _leaves_of(x: object, node: _Node | None, what: str, path: str = "") -> list[Any]:
    """The leaves of ``x`` in the order of ``node``'s structure (dict entries by key, so a
    dict built in another order is read right); raise naming the part that differs."""
    if node is None:
        return [x]
    out: list[Any] = []
    if issubclass(node.kind, dict):
        if not isinstance(x, Mapping):
            raise TypeError(
                f"`{what}{path}` must be a dict with the keys {list(node.keys)}, like the state, "
                f"got {type(x).__name__}."
            )
        if len(x) != len(node.keys) or any(k not in x for k in node.keys):
            raise ValueError(
                f"`{what}{path}` must have the state's keys {list(node.keys)}, got {list(x)}."
            )
        for k, child in zip(node.keys, node.children):
            out.extend(_leaves_of(x[k], child, what, f"{path}[{k!r}]"))
        return out
    if not isinstance(x, (tuple, list)) or len(x) != len(node.keys):
        got = f"length {len(x)}" if isinstance(x, (tuple, list)) else type(x).__name__
        raise (ValueError if isinstance(x, (tuple, list)) else TypeError)(
            f"`{what}{path}` must be a {node.kind.__name__} of {len(node.keys)} parts, like the "
            f"state, got {got}."
        )
    for i, child in enumerate(node.children):
        out.extend(_leaves_of(x[i], child, what, f"{path}[{i}]"))
    return out


def _build(node: _Node, tensors: Any) -> Any:
    values = [next(tensors) if child is None else _build(child, tensors) for child in node.children]
    return _new_container(node.kind, node.keys, values)


def map_leaves(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """``state`` with ``fn`` applied to each tensor (containers rebuilt; other values kept)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, Mapping):
        kind = type(state) if isinstance(state, dict) else dict
        return _new_container(kind, tuple(state), [map_leaves(fn, v) for v in state.values()])
    if isinstance(state, (tuple, list)):
        return _new_container(type(state), (), [map_leaves(fn, v) for v in state])
    return state


def first_leaf(y0: object) -> object:
    """The first tensor of a structured state (``y0`` itself when it is not a container)."""
    while isinstance(y0, (tuple, list, Mapping)) and len(y0) > 0:
        y0 = next(iter(y0.values())) if isinstance(y0, Mapping) else y0[0]
    return y0


class StructuredDynamics(nn.Module):
    """The user's dynamics of a structured state as dynamics of its flat real vector.

    A module, so that the user's module (``dynamics``) stays reachable for what walks modules:
    frozen BatchNorm in a backward pass, parameter names for ``torch.func.functional_call``.
    """

    def __init__(self, dynamics: Callable[..., Any], structure: StateStructure) -> None:
        super().__init__()
        self.dynamics = dynamics
        self.structure = structure

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``dy/dt`` as a flat vector: the dynamics on the structure of ``y``'s views."""
        return self.structure.flatten(self.dynamics(t, self.structure.unflatten(y)), "dy/dt")

    # Called once per evaluation: skip nn.Module's hook dispatch (this wrapper has no hooks;
    # the user's module, called inside, keeps its own).
    __call__ = forward  # type: ignore[assignment]


def non_finite_part(func: object, flat: torch.Tensor) -> str:
    """For an error message: ``" (in `y['v']`)"``, the first part of a structured state where
    ``flat`` is not finite, when ``func`` (or the dynamics a ``Dynamics`` wraps) is
    :class:`StructuredDynamics`; ``""`` otherwise."""
    inner = getattr(func, "func", func)
    if not isinstance(inner, StructuredDynamics):
        return ""
    name = inner.structure.describe(flat)
    return f" (in `{name}`)" if name else ""
