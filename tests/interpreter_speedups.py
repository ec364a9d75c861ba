"""Faster paths for Triton's interpreter (tests only, ``TRITON_INTERPRET=1``): same results.

The interpreter reduces with a combine function it does not know element by element in
Python (``ReduceOps.generic_reduce``: a ``to_tensor`` and a call of the combine function per
element). ``tl.sort`` does one ``xor_sum`` per compare-and-swap stage, so each sort of a
1,024-slot row costs ~55 such reductions: under the interpreter the top_k select's sort was
close to half of a test's time. XOR is associative and commutative, so numpy's
``bitwise_xor.reduce`` gives the same integers in any order; ``install`` routes exactly that
combine function there and leaves every other one to Triton.

Each call of a ``@triton.jit`` function from inside a kernel re-patches ``triton.language``
(``_patch_lang``): ``_patch_builtin`` walks every member of tl, tl.core, tl.tensor, tl.math
with ``inspect.getmembers`` to find the builtins (a quarter of a histogram test's time). The
names of those builtins are fixed when Triton is imported, so ``install`` lists them once
per namespace (a member that a patch already replaced counts by the builtin it wraps) and
then looks at only those names: the same attributes patched, in the same order.

Both are checked against Triton's own paths in tests/test_interpreter_speedups.py.
"""

from __future__ import annotations

import numpy as np


def _parts():
    """(ReduceOps, the xor combine function), or None where this Triton lays them out
    differently (then nothing is patched: only slower)."""
    try:
        from triton.language import standard
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return None
    ops, xor = getattr(interpreter, "ReduceOps", None), getattr(standard, "_xor_combine", None)
    if ops is None or xor is None or not all(hasattr(ops, n) for n in ("apply_impl", "to_tensor", "generic_reduce")):
        return None
    return ops, xor


def xor_reduce(ops, input):
    """``xor_sum`` of one integer tensor along ``ops.axis`` (all of it if None), numpy's way."""
    (x,) = input
    data = x.handle.data
    out = np.bitwise_xor.reduce(data, axis=ops.axis, keepdims=ops.keep_dims, dtype=data.dtype)
    return ops.to_tensor(out, x.dtype)


def _wraps_builtin(member) -> bool:
    """A builtin, or the interpreter's patch of one (its lambda keeps it as a default)."""
    from triton.language.core import is_builtin

    return is_builtin(member) or any(is_builtin(d) for d in (getattr(member, "__defaults__", None) or ()))


def builtin_names(pkg) -> tuple[str, ...]:
    """``pkg``'s members that are (or patch) builtins, in ``inspect.getmembers``' order."""
    import inspect

    return tuple(name for name, member in inspect.getmembers(pkg) if _wraps_builtin(member))


def _install_patch_builtin() -> bool:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return False
    original = getattr(interpreter, "_patch_builtin", None)
    if original is None or not hasattr(interpreter, "_patch_attr"):
        return False
    if getattr(original, "original", None) is not None:
        return True
    spaces = [tl, tl.core, tl.tensor, tl.math]
    descriptor = getattr(tl.core, "tensor_descriptor_base", None)
    spaces += [descriptor] if descriptor is not None else []
    names = {id(pkg): (pkg, builtin_names(pkg)) for pkg in spaces}
    is_builtin = tl.core.is_builtin

    def patch_builtin(pkg, builder, scope):
        known = names.get(id(pkg))
        if known is None or known[0] is not pkg:
            return original(pkg, builder, scope)
        for name in known[1]:
            member = getattr(pkg, name, None)
            if is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    patch_builtin.original = original
    interpreter._patch_builtin = patch_builtin
    return True


def install() -> bool:
    """Route the interpreter's ``xor_sum`` through numpy and list the builtins once; True if
    both are patched (idempotent)."""
    patched = _install_patch_builtin()
    parts = _parts()
    if parts is None:
        return False
    ops, xor = parts
    original = ops.apply_impl
    if getattr(original, "_uld_fast_xor", False):
        return patched

    def apply_impl(self, input):
        if self.combine_fn == xor and len(input) == 1:
            return xor_reduce(self, input)
        return original(self, input)

    apply_impl._uld_fast_xor = True
    apply_impl.original = original
    ops.apply_impl = apply_impl
    return patched
