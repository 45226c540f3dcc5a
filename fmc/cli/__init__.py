"""The `fmc` command: a typer app whose commands live one per module in this package."""

from __future__ import annotations

import signal
import sys
import threading

import click
import typer

from fmc.errors import INTERRUPTED_EXIT_CODE, FmcError, Terminated

app = typer.Typer(
    name="fmc",
    help="Ahead-of-time compiler for foundation models (LLMs), built on Apache TVM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
            quiet: bool = typer.Option(False, "--quiet", help="Log errors only (any command).")):
    from fmc.cli.output import GLOBAL_QUIET

    _state["debug"] = debug
    GLOBAL_QUIET["on"] = quiet


# Command name → its module in this package (the function is `<name>_command`, or the
# module's typer `app` for a command group). Only the invoked command's module is imported:
# each pulls in its own dependencies, and `fmc targets` should not pay for `fmc serve`'s.
COMMANDS = ("compile", "build", "run", "chat", "serve", "inspect", "bench", "ppl", "passes",
            "archs", "compare", "targets", "verify", "doctor", "quant", "cache")
GROUPS = ("quant", "cache")


def register_commands(only: str | None = None) -> None:
    """Attach the command `only` to `app`, or every command (help listings, tests)."""
    import importlib

    app.registered_commands.clear()
    app.registered_groups.clear()
    for name in (only,) if only else COMMANDS:
        module = importlib.import_module(f"fmc.cli.{name}")
        if name in GROUPS:
            app.add_typer(module.app, name=name)
        else:
            app.command(name)(getattr(module, f"{name}_command"))


def _invoked(argv: list[str]) -> str | None:
    """The command `argv` runs, when it is plain; None for help or anything unexpected (then
    every command is registered and click reports what is wrong)."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):  # past the global options (--debug, --quiet)
            return arg if arg in COMMANDS else None
    return None


class _Signals:
    """SIGINT and SIGTERM become exceptions that unwind (cleaning up staging directories).
    A signal that lands inside a Python callback TVM runs comes back wrapped in a TVM error;
    `received` lets main still report it as an interruption."""

    received: int | None = None

    @classmethod
    def handle(cls, signum, frame):
        cls.received = signum
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    @classmethod
    def install(cls) -> dict:
        """Set the handlers; returns the previous ones for `restore`."""
        cls.received = None
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, cls.handle)
                for signum in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def restore(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    @classmethod
    def exit_code(cls) -> int:
        return Terminated.exit_code if cls.received == signal.SIGTERM \
            else INTERRUPTED_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors with documented exit codes (see docs/cli.md)."""
    _state["debug"] = False  # set by the global option's callback, once parsed
    previous = _Signals.install()
    try:
        return _main(argv)
    finally:
        _Signals.restore(previous)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        register_commands(_invoked(argv))
        result = app(args=argv, standalone_mode=False)
        # typer turns a KeyboardInterrupt into exit code 130, returned (not raised) here.
        if result == INTERRUPTED_EXIT_CODE:
            sys.stderr.write("fmc: interrupted\n")
            return _Signals.exit_code()
        if isinstance(result, int) and result:
            return result
    except FmcError as exc:
        if _state["debug"]:
            raise
        sys.stderr.write(f"fmc: error: {exc}\n")
        return exc.exit_code
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    # typer 0.29 raises its vendored click's exceptions (typer._click), not click's own.
    except (click.ClickException, typer.TyperException) as exc:
        exc.show()
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort, typer.Abort):
        sys.stderr.write("fmc: interrupted\n")
        return _Signals.exit_code()
    except BrokenPipeError:
        return 1
    except Exception as exc:  # an fmc bug, not a user error: still one line unless --debug
        if _Signals.received is not None:
            sys.stderr.write("fmc: interrupted\n")
            return _Signals.exit_code()
        if _state["debug"]:
            raise
        sys.stderr.write(f"fmc: internal error: {type(exc).__name__}: {exc} "
                         "(rerun with --debug for a traceback)\n")
        return 1
    return 0


def entry() -> None:
    sys.exit(main())
