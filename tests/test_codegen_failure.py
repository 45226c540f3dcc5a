"""A TVM failure in the lower or codegen phase is exit 8, one line naming the kernel (when
found), the target and the shape, never "internal error", and leaves nothing behind
(fmc/lowering/codegen_failure.py). Injected with pass plugins that make TVM fail."""

from __future__ import annotations

import re

from fmc.cli import main

RAISES = '''
import tvm
from fmc.lowering import PassSpec, register_pass


@tvm.transform.module_pass(opt_level=0, name="Explode")
def explode(mod, ctx):
    raise tvm.error.InternalError("Check failed: (injected) is false: a TVM check")


register_pass(PassSpec("explode", "lower", "raise a TVM error", lambda ctx: explode),
              after="schedule")
'''

# A kernel TVM's CPU code generator refuses: a vectorized loop of symbolic extent.
ADDS_A_BROKEN_KERNEL = '''
import tvm
from tvm.script import tirx as T
from fmc.lowering import PassSpec, register_pass


@T.prim_func(private=True)
def vectorized_over_tokens(a: T.handle):
    n = T.int32()
    A = T.match_buffer(a, (n,), "float32")
    for i in T.vectorized(n):
        A[i] = A[i] + T.float32(1)


@tvm.transform.module_pass(opt_level=0, name="AddBrokenKernel")
def add_broken_kernel(mod, ctx):
    mod[tvm.ir.GlobalVar("vectorized_over_tokens")] = vectorized_over_tokens
    return mod


register_pass(PassSpec("add-broken-kernel", "lower", "add a kernel TVM cannot build",
                       lambda ctx: add_broken_kernel), after="schedule")
'''

SHAPE = r"\(llama, hidden 64, 4 heads / 4 KV heads, head_dim 16, MLP 96, vocab 160, q0f32\)"


def _compile_with(plugin_source, tiny_checkpoint, tmp_path, capsys):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(plugin_source)
    checkpoint = tiny_checkpoint("llama-mha")  # written first: its progress goes to stderr
    capsys.readouterr()
    code = main(["--quiet", "compile", str(checkpoint), "-o",
                 str(tmp_path / "out"), "--pass-plugin", str(plugin)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmc: error: "), err
    assert "internal error" not in err and "Traceback" not in err and not out.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plugin.py"]  # nothing left
    return code, lines[0]


def test_a_tvm_error_in_a_lower_pass_is_exit_8_naming_the_pass(tiny_checkpoint, tmp_path,
                                                              capsys):
    code, line = _compile_with(RAISES, tiny_checkpoint, tmp_path, capsys)
    assert code == 8
    assert re.search(r"the cpu code generator failed in the lower phase on pass 'explode' "
                     + SHAPE + r": InternalError: .*a TVM check; a pass plugin may be at "
                     r"fault", line), line


def test_a_kernel_tvm_cannot_build_is_exit_8_naming_the_kernel(tiny_checkpoint, tmp_path,
                                                               capsys):
    code, line = _compile_with(ADDS_A_BROKEN_KERNEL, tiny_checkpoint, tmp_path, capsys)
    assert code == 8
    assert re.search(r"the cpu code generator failed in the codegen phase on kernel "
                     r"'vectorized_over_tokens' " + SHAPE + r": InternalError: .*Failed to "
                     r"vectorize loop with extent n", line), line


def test_an_fmc_bug_stays_an_internal_error(tiny_checkpoint, tmp_path, capsys):
    """An exception from a plugin's (or fmc's) own Python code is not TVM's: exit 1."""
    source = RAISES.replace('raise tvm.error.InternalError("Check failed: (injected) is '
                            'false: a TVM check")', "raise KeyError('a Python bug')")
    plugin = tmp_path / "plugin.py"
    plugin.write_text(source)
    code = main(["--quiet", "compile", str(tiny_checkpoint("llama-mha")), "-o",
                 str(tmp_path / "out"), "--pass-plugin", str(plugin)])
    assert code == 1 and "internal error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
