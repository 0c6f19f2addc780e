"""The `pathlens` command group and what every command shares: one-line error reporting, option checks, the
output folder check and model loading.

Every user mistake ends in one message, no traceback (`pathlens --debug ...` shows it): an option value the run
cannot use (unknown model, task, method or site family) is a usage error, exit code 2, reported like typer's own;
a run that fails (an output folder that cannot be written, a PathlensError or a file error during the run)
prints one `error: ...` line on stderr and exits with 1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from pathlens.errors import PathlensError
from pathlens.loading import load
from pathlens.model import Model
from pathlens.patching.plan import GROUP_ALIASES, SWEEP_GROUPS, sweep_group
from pathlens.tasks import TASKS

console = Console()
error_console = Console(stderr=True)


class ReportingGroup(TyperGroup):
    """The command group: a failed run prints one `error:` line and exits 1 (the traceback only with --debug)."""

    def invoke(self, ctx: Any) -> Any:  # a click Context of the click version typer vendors
        try:
            return super().invoke(ctx)
        except (PathlensError, OSError) as err:
            if (ctx.obj or {}).get("debug"):
                raise
            message = " ".join(str(err).split())
            error_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from err


app = typer.Typer(
    cls=ReportingGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Find, verify and steer pathways in neural networks.",
)


@app.callback()
def root(
    ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="on an error, show the full traceback")
) -> None:
    """Find, verify and steer pathways in neural networks."""
    ctx.obj = {"debug": debug}


@contextmanager
def option(hint: str) -> Iterator[None]:
    """Report a PathlensError raised in the block as a bad value of option `hint` (a usage error, exit 2)."""
    try:
        yield
    except PathlensError as err:
        raise typer.BadParameter(str(err), param_hint=hint) from err


def output_folder(out: Path) -> Path:
    """Create `out` and check it is writable, before any model loads, so a bad --out fails in a second."""
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise PathlensError(f"--out {out}: {blocking} is a file, not a folder; pass another folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PathlensError(f"--out {out}: cannot create the output folder ({err}); pass another folder.") from err
    if not os.access(out, os.W_OK):
        raise PathlensError(f"--out {out}: the output folder is not writable; pass another folder.")
    return out


def site_group(sites: str) -> str:
    """The sweep group a --sites value names ("resid" → "resid_pre"), or a usage error listing the choices."""
    group = sweep_group(sites)
    if group not in SWEEP_GROUPS:
        raise typer.BadParameter(
            f"unknown site family {sites!r}; use one of {', '.join([*GROUP_ALIASES, *SWEEP_GROUPS])}.",
            param_hint="'--sites'",
        )
    return str(group)


def task_choice(task: str) -> str:
    """A --task value checked against the task names (before the model loads)."""
    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.", param_hint="'--task'")
    return task


def load_model(name: str, hint: str = "'--model'") -> Model:
    with option(hint), console.status(f"loading {name} …"):
        start = time.perf_counter()
        model = load(name)
    console.print(f"[green]loaded[/] {model!r} in {time.perf_counter() - start:.1f} s")
    return model


def main() -> None:
    """The `pathlens` entry point (failed runs are reported by `ReportingGroup`, usage errors by typer)."""
    app()


if __name__ == "__main__":
    main()
