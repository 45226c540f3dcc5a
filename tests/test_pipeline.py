"""The visible pipeline: `fmc passes`, --disable-pass, --dump-ir, pass plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmc.cli import main
from fmc.compiler import CompileOptions, build_ir
from fmc.errors import InputError, UsageError
from fmc.lowering import pipeline

EXAMPLE = Path(__file__).parent.parent / "examples" / "pass_plugin_kernel_report.py"


@pytest.fixture
def restore_pipeline(monkeypatch):
    monkeypatch.setattr(pipeline, "PIPELINE", list(pipeline.PIPELINE))


def test_passes_lists_phases_and_passes_in_order(capsys):
    assert main(["passes", "--json"]) == 0
    phases = json.loads(capsys.readouterr().out)
    assert [p["phase"] for p in phases] == ["import", "quantize", "fuse", "lower", "codegen",
                                            "weights", "package"]
    fuse = [p["name"] for p in phases[2]["passes"]]
    assert fuse.index("fuse-ops") < fuse.index("fuse-tir") < fuse.index("fuse-dequantize-matmul")
    assert all(p["doc"] for phase in phases for p in phase["passes"])


def test_dump_ir_writes_tvmscript_after_every_pass(tiny_checkpoint, tmp_path):
    dumps = tmp_path / "ir"
    build_ir(CompileOptions(model=str(tiny_checkpoint("llama-mha")), dump_ir=dumps,
                            disable_passes=["fold-constants"]))
    files = sorted(p.name for p in dumps.glob("*.py"))
    expected = ["export"] + [p.name for p in pipeline.PIPELINE if p.name != "fold-constants"]
    assert [f.split("-", 2)[2][:-3] for f in files] == expected
    assert [int(f[:2]) for f in files] == list(range(len(files)))
    for name in files:
        text = (dumps / name).read_text()
        assert "@I.ir_module" in text and "def decode(" in text


def test_disable_pass_changes_the_ir(tiny_checkpoint):
    model = str(tiny_checkpoint("llama-mha"))
    fused = build_ir(CompileOptions(model=model)).mod
    unfused = build_ir(CompileOptions(model=model, disable_passes=["fuse-ops"])).mod
    def epilogue_fused(mod) -> list[str]:  # a matmul kernel that also does the residual add
        return [gv.name_hint for gv, _ in mod.functions_items()
                if "matmul" in gv.name_hint and gv.name_hint.endswith(("_add", "_add1"))]

    assert epilogue_fused(fused) and not epilogue_fused(unfused)


def test_pass_plugin_adds_a_pass(restore_pipeline, tiny_checkpoint, tmp_path, caplog, capsys):
    assert main(["passes", "--json", "--pass-plugin", str(EXAMPLE)]) == 0
    fuse = [p["name"] for p in json.loads(capsys.readouterr().out)[2]["passes"]]
    assert fuse[fuse.index("dead-code") + 1] == "kernel-report"
    dumps = tmp_path / "ir"
    with caplog.at_level("INFO", logger="fmc"):
        build_ir(CompileOptions(model=str(tiny_checkpoint("llama-mha")), dump_ir=dumps,
                                pass_plugins=[str(EXAMPLE)]))
    assert any(p.name.endswith("-fuse-kernel-report.py") for p in dumps.iterdir())
    assert "kernel-report: decode launches" in caplog.text


def test_pass_plugin_can_replace_a_pass(restore_pipeline, tiny_checkpoint, tmp_path):
    plugin = tmp_path / "no_schedule.py"
    plugin.write_text(
        "import tvm\nfrom fmc.lowering import PassSpec, register_pass\n"
        "register_pass(PassSpec('identity-schedule', 'lower', 'leave kernels unscheduled',"
        " lambda ctx: tvm.transform.Sequential([])), replace='schedule')\n")
    state = build_ir(CompileOptions(model=str(tiny_checkpoint("llama-mha")),
                                    pass_plugins=[str(plugin)]))
    assert "schedule" not in pipeline.pass_names()
    assert "T.parallel" not in state.mod.script()


def test_bad_pass_plugins_are_clear_errors(restore_pipeline, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InputError, match="broken.py: pass plugin failed to load: "
                                         "RuntimeError: boom"):
        pipeline.load_pass_plugin(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(InputError, match="registers no pass"):
        pipeline.load_pass_plugin(empty)
    with pytest.raises(UsageError, match="did you mean 'fuse-ops'"):
        pipeline.register_pass(pipeline.PassSpec("x", "fuse", "x", lambda c: None),
                               after="fuse-op")
