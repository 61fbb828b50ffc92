"""The exact difference between two JSON values, and its application (pure).

A span carries a run's events as what the event builders rebuild from it,
plus, per event, whatever the rebuild got wrong: the difference between the
rebuilt event and the real one, as computed here. Applying it gives back the
real event exactly: the same values of the same JSON types, and the same key
order in every object, so the serialised event is the same byte for byte.

A patch is a list of operations on paths (lists of object keys and array
indexes): `[path, value]` sets the value at `path` (a key not there yet is
added at the end of its object), `[path]` deletes it. The empty path is the
whole value. This is RFC 6902's `replace`/`add`/`remove` with paths as lists,
smaller than its pointers and unambiguous for keys holding `/` or `~`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PatchError", "apply_patch", "diff"]

Patch = list[list[Any]]


class PatchError(ValueError):
    """A patch that does not fit the value it is applied to."""


def diff(base: Any, target: Any) -> Patch:
    """The patch that makes `target` of `base`: empty when they serialise to
    the same JSON (the same types, so 1, 1.0 and true differ, and objects
    with their keys in the same order)."""
    out: Patch = []
    _diff(base, target, [], out)
    return out


def _diff(base: Any, target: Any, path: list, out: Patch) -> None:
    kind = type(base)
    if kind is dict and type(target) is dict:
        kept = [key for key in base if key in target]
        added = [key for key in target if key not in base]
        # Setting a key that is not there appends it, so the target's order
        # comes out of the operations only if its kept keys keep their order
        # and the new ones come after them.
        if list(target) == kept + added:
            out.extend([[*path, key]] for key in base if key not in target)
            for key in kept:
                _diff(base[key], target[key], [*path, key], out)
            out.extend([[*path, key], target[key]] for key in added)
            return
    elif kind is list and type(target) is list and len(base) == len(target):
        for index, (a, b) in enumerate(zip(base, target)):
            _diff(a, b, [*path, index], out)
        return
    elif kind is type(target) and kind is not dict and kind is not list and base == target:
        return
    out.append([path, target])


def apply_patch(value: Any, patch: Any) -> Any:
    """`value` changed by `patch` (in place where it can be; use the result).
    Raises `PatchError` for a patch that is malformed or does not fit."""
    if type(patch) is not list:
        raise PatchError("a patch is a list of operations")
    for operation in patch:
        if type(operation) is not list or len(operation) not in (1, 2) \
                or type(operation[0]) is not list:
            raise PatchError(f"not a patch operation: {operation!r:.80}")
        path = operation[0]
        if not path:
            if len(operation) == 1:
                raise PatchError("cannot delete the whole value")
            value = operation[1]
            continue
        holder = value
        for step in path[:-1]:
            holder = _step(holder, step)
        last = path[-1]
        if type(holder) is dict and type(last) is str:
            if len(operation) == 2:
                holder[last] = operation[1]
            elif holder.pop(last, _MISSING) is _MISSING:
                raise PatchError(f"no key {last!r:.80} to delete")
        elif type(holder) is list and type(last) is int and 0 <= last < len(holder) \
                and len(operation) == 2:
            holder[last] = operation[1]
        else:
            raise PatchError(f"path {path!r:.80} does not fit the value")
    return value


_MISSING = object()


def _step(holder: Any, step: Any) -> Any:
    if type(holder) is dict and type(step) is str and step in holder:
        return holder[step]
    if type(holder) is list and type(step) is int and 0 <= step < len(holder):
        return holder[step]
    raise PatchError(f"no {step!r:.80} in the value")
