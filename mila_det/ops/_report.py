"""What each Triton module declares about its kernels for
``tools/analysis/kernel_report.py``: the variants the backbones compile
and the launches they make at the backbones' real shapes.

Every ``mila_det/ops/<op>/triton.py`` defines ``report_variants()`` (a list
of :class:`KernelVariant`) and ``report_launches()`` (a list of
:class:`KernelLaunch`); the report compiles the former offline and prints
the latter, and its test checks both against the hardware limits.
"""
from typing import Dict, NamedTuple


class KernelVariant(NamedTuple):
    """One compiled form of a kernel.

    ``signature`` maps every argument name to a Triton type (``'*fp32'``,
    ``'i32'``, ``'i64'``, ``'fp32'``, ``'constexpr'``), ``constexprs`` the
    compile-time ones to their values, as ``triton.compiler.ASTSource``
    takes them.
    """
    kernel: str
    detail: str  # e.g. 'fp32 d32', 'bf16 gate'
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 2


class KernelLaunch(NamedTuple):
    """One launch at a backbone's shape: ``detail`` names the variant it
    runs, ``bytes`` what it reads and writes in HBM."""
    model: str  # e.g. 'MILA-T b1' (stage 1, 1x3x800x1280, batch 1)
    kernel: str
    detail: str
    programs: int
    bytes: int


def signature(fn, types: Dict[str, str],
              constexprs: Dict[str, object]) -> Dict[str, str]:
    """A full signature for ``fn``: constexprs marked, other arguments
    typed from ``types`` (``'i32'`` when not named)."""
    return {
        name: 'constexpr' if name in constexprs else types.get(name, 'i32')
        for name in fn.arg_names
    }
