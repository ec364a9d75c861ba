"""`const`: the kernels' module constants, `tl.constexpr` with a cheap `!=`.

Triton checks, at every launch, that each global a kernel reads (with those of the functions
it calls) still has the value it was compiled with: `new != old` for each, where `old` is a
deep copy. `tl.constexpr.__ne__` builds two objects per comparison, ~2 us on this project's
CPU machine; hist_kernel reads 40 globals, and 43-76 us of host time a launch went there
(bench/RESULTS.md, twenty-first session). `const` answers an unchanged value at once and defers to
`tl.constexpr` otherwise; it is a `tl.constexpr` in every other respect (the same repr, so
the same cache keys and compiled kernels).
"""

from __future__ import annotations

import triton.language as tl

_UNCHANGED = tl.constexpr(False)  # what tl.constexpr.__ne__ gives for equal values


class const(tl.constexpr):  # noqa: N801 (a constant's type, named like tl.constexpr)
    def __ne__(self, other):
        if type(other) is const and type(other.value) is type(self.value) and other.value == self.value:
            return _UNCHANGED
        return tl.constexpr.__ne__(self, other)
