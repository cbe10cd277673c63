"""The typer application that the command modules (:mod:`cryosplat.cli`,
:mod:`cryosplat.cli_poses`) register their commands on."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cryo-EM reconstruction with a physics-exact Gaussian-splatting renderer.")
