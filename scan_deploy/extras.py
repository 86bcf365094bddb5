"""Optional dependencies: which extra of `scan-deploy` installs a missing module.

`pip install scan-deploy` brings numpy, typer and rich only; a command that needs more says, in one
line, which extra to install instead of showing an ImportError traceback. The command line applies
`missing_extra` at the edge of every command (`cli.CommandGroup`).
"""

from __future__ import annotations

from dataclasses import dataclass

from scan_deploy.errors import UserError


@dataclass(frozen=True)
class Extra:
    what: str  # the package as users know it
    extras: tuple[str, ...]  # the extras that install it, the usual one first

    def install(self) -> str:
        first, *others = self.extras
        return f"pip install 'scan-deploy[{first}]'" + "".join(
            f" or 'scan-deploy[{name}]'" for name in others
        )


# Top-level module -> what it is and which extras of pyproject.toml install it.
EXTRAS = {
    "torch": Extra("PyTorch", ("reference",)),
    "safetensors": Extra("safetensors", ("reference",)),
    "onnx": Extra("ONNX", ("export", "gpu")),
    "onnxruntime": Extra("ONNX Runtime", ("export", "gpu")),
    "faiss": Extra("FAISS", ("faiss",)),
    "matplotlib": Extra("matplotlib", ("plots",)),
    "PIL": Extra("Pillow", ("plots",)),
    "fastapi": Extra("FastAPI", ("serve",)),
    "starlette": Extra("FastAPI", ("serve",)),
    "uvicorn": Extra("uvicorn", ("serve",)),
    "prometheus_client": Extra("prometheus-client", ("serve",)),
    "ray": Extra("Ray", ("ray",)),
}


def missing_extra(exc: ModuleNotFoundError, command: str) -> UserError | None:
    """The one-line error "`COMMAND` needs WHAT: pip install 'scan-deploy[EXTRA]'" when `exc` is
    about a module that an extra installs; None for any other module (a bug, whose traceback
    should show)."""
    extra = EXTRAS.get((exc.name or "").partition(".")[0])
    if extra is None:
        return None
    return UserError(f"`{command}` needs {extra.what}: {extra.install()}")
