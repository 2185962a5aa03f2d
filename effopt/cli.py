"""The ``effopt`` command. Exit codes: 0 ok, 1 verification failed, 2 bad input, 3 internal error.

The CLI owns the terminal: library code returns values and raises typed
errors; only this module prints, and `exit_code_for` is the one place errors
become exit codes.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from effopt.errors import EffoptError

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def exit_code_for(error: BaseException) -> int:
    return error.exit_code if isinstance(error, EffoptError) else EXIT_INTERNAL


def _quiet_libraries() -> None:
    """torch's ONNX exporter and export warn loudly about things users cannot act on."""
    for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch._dynamo", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except EffoptError as e:
            click.echo(f"effopt: error: {e}", err=True)
            sys.exit(exit_code_for(e))
        except Exception as e:  # a bug in effopt: say so, keep the traceback for the bug report
            traceback.print_exc()
            click.echo(f"effopt: internal error: {type(e).__name__}: {e} (please report this)", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


@click.group()
@click.version_option(package_name="effopt")
def main() -> None:
    """effopt: a declarative, compiler-style optimizer for trained PyTorch models."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--target", help="Hardware profile name or YAML path (default: the recipe's target).")
@_handle_errors
def inspect(recipe: Path, target: str | None) -> None:
    """Per-layer table: op, output shape, params, MACs, FLOPs, bytes, intensity."""
    from effopt.optimizer.compiler import prepare
    from effopt.optimizer.tables import layer_table

    prepared = prepare(recipe, target=target)
    click.echo(layer_table(prepared.ir, prepared.profile))


@main.command(name="compile")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), help="Output folder (overrides output.dir).")
@_handle_errors
def compile_cmd(recipe: Path, output: Path | None) -> None:
    """Optimize, verify and emit artefacts + report; exit 0 only if verification passed."""
    from effopt.optimizer.compiler import compile as run_compile

    result = run_compile(recipe, output_dir=output)
    click.echo(result.report.to_markdown())
    click.echo(f"artefacts: {result.output_dir}")
    if not result.passed:
        where = result.output_dir / "report.json" if result.output_dir else "the report"
        click.echo(f"effopt: verification failed; artefacts and {where} were written anyway:", err=True)
        for failure in result.report.failures():
            click.echo(f"  - {failure}", err=True)
        sys.exit(EXIT_VERIFY_FAILED)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--artifact", type=click.Path(path_type=Path), help="Folder with model.pt2/model.onnx (default: output.dir).")
@_handle_errors
def evaluate(recipe: Path, artifact: Path | None) -> None:
    """Metrics of the original model and of each emitted artefact on the recipe's data.eval."""
    from effopt.optimizer.compiler import evaluate_artefacts
    from effopt.optimizer.report import evaluation_table

    stages = evaluate_artefacts(recipe, artifact)
    first = stages[0].evaluation
    click.echo(f"{first.task} on {first.dataset} ({(first.classification or first.agreement).samples} samples)\n")
    click.echo("\n".join(evaluation_table(stages)))


@main.command()
@_handle_errors
def passes() -> None:
    """List the registered passes and their options."""
    from effopt.optimizer.tables import passes_table

    click.echo(passes_table())


if __name__ == "__main__":
    main()
