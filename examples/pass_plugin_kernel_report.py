"""An fmc pass plugin: report how many TIR kernels each entry function launches.

Use it with:  fmc compile MODEL --pass-plugin examples/pass_plugin_kernel_report.py -o OUT
              fmc passes --pass-plugin examples/pass_plugin_kernel_report.py

A plugin is a Python file that calls `fmc.lowering.register_pass` with a `PassSpec`: a name,
the phase, a one-line doc, and a factory that builds a TVM pass from the compile's frozen
`fmc.lowering.PassContext` (target, compute_dtype, entry_functions, override_kernels).
Position it with before=/after= (a new pass) or replace= (swap out an existing one).
"""

import logging

import tvm
from tvm import relax

from fmc.lowering import PassSpec, register_pass

log = logging.getLogger("fmc")


def count_kernel_calls(func: relax.Function) -> int:
    call_tir = tvm.ir.Op.get("relax.call_tir")
    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == call_tir:
            calls.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return len(calls)


@tvm.transform.module_pass(opt_level=0, name="KernelReport")
class KernelReport:
    """Counts call_tir bindings per Relax function; changes nothing."""

    def transform_module(self, mod, _ctx):
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                log.info("kernel-report: %s launches %d kernels", gv.name_hint,
                         count_kernel_calls(func))
        return mod


register_pass(PassSpec("kernel-report", "fuse", "log the kernels each entry function launches",
                       lambda ctx: KernelReport()), after="dead-code")
