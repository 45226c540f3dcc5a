"""`fmc build`: compile the builds of an fmc.toml, skipping up-to-date ones."""

from __future__ import annotations

from pathlib import Path

import typer

from fmc.cli.output import (
    cache_dir_option,
    emit_json,
    is_quiet,
    no_cache_option,
    quiet_option,
    setup_logging,
    stderr,
)


def build_command(
    config: Path = typer.Option(Path("fmc.toml"), "--config", "-c", help="The build file."),
    only: list[str] = typer.Option([], "--only", help="Build just this one (repeatable)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Compile even if up to date."),
    cache_dir: Path = cache_dir_option(),
    no_cache: bool = no_cache_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
    quiet: bool = quiet_option(),
) -> None:
    """Compile every build of fmc.toml (models × targets × quants) whose inputs, settings or
    fmc/TVM versions changed since its last build; stop at the first failure."""
    from fmc.cli.progress import CompileProgress
    from fmc.errors import unknown_choice
    from fmc.project.config import load
    from fmc.project.runner import run_build

    quiet = is_quiet(quiet)
    setup_logging(quiet or json_out)
    builds = load(config)
    names = [b.name for b in builds]
    for name in only:
        if name not in names:
            raise unknown_choice("build", name, names)
    selected = [b for b in builds if not only or b.name in only]
    results = []
    for build in selected:
        with CompileProgress(quiet or json_out) as progress:
            result = run_build(build, config.resolve().parent, rebuild, progress,
                               cache={"use_cache": False if no_cache else None,
                                      "cache_dir": cache_dir})
        results.append(result)
        if not (quiet or json_out):
            stderr.print(f"[bold]{result['name']}[/]: {result['status']} "
                         f"({result['seconds']:.1f} s) → {result['output']}")
    if json_out:
        emit_json({"config": str(config), "builds": results})
