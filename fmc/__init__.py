"""fmc: an ahead-of-time compiler for foundation models, built on Apache TVM."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a compiled artifact directory; see `fmc.runtime.Engine`."""
    from fmc.runtime.engine import Engine

    return Engine(path, **kwargs)


def compile(model=None, output=None, **kwargs):  # noqa: A001 - mirrors the CLI verb
    """Compile `model` into an artifact at `output`; see `fmc.compiler.CompileOptions`."""
    from fmc.compiler import CompileOptions, compile_model

    return compile_model(CompileOptions(model=model, output=output, **kwargs))
