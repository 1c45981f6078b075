"""The ``m4r`` command line.

Each stage owns its commands in its own module; this file only lists them (loaded lazily, so
``m4r --help`` stays fast and a command's heavy imports happen only when it runs) and turns
:class:`~m4r_export.errors.M4RError` into a one-line message and an exit code.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .errors import M4RError

#: command name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "data": "m4r_export.data.cli:data",
    "export": "m4r_export.onnx.cli:export",
    "build-plugin": "m4r_export.trt.cli:build_plugin",
    "build-native": "m4r_export.trt.cli:build_native_cmd",
    "build-ort-ops": "m4r_export.onnx.cli:build_ort_ops",
    "build-engine": "m4r_export.trt.cli:build_engine",
    "verify": "m4r_export.verify.cli:verify",
    "bench": "m4r_export.verify.cli:bench",
    "train": "m4r_export.training.cli:train",
    "evaluate": "m4r_export.training.cli:evaluate",
    "bench-train": "m4r_export.training.bench:bench_train",
    "demo": "m4r_export.demo:demo",
    "triton": "m4r_export.serve.cli:triton",
    "serve": "m4r_export.serve.run:serve_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        cmd = getattr(importlib.import_module(module_name), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except M4RError as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="m4r-export")
def main() -> None:
    """m4r: train, export, verify and serve Mamba4Rec sequential recommenders."""


if __name__ == "__main__":
    main()
