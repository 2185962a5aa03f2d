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

from effopt.errors import EffoptError, RecipeError

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
    from effopt.optimizer.report.tables import layer_table

    prepared = prepare(recipe, target=target)
    click.echo(layer_table(prepared.ir, prepared.profile if target else None))
    if not target:
        click.echo(f"target: {prepared.profile.name} (add --target NAME for predicted time and bottleneck per layer)")


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
    from effopt.optimizer.report.report import evaluation_table

    stages = evaluate_artefacts(recipe, artifact)
    first = stages[0].evaluation
    click.echo(f"{first.task} on {first.dataset} ({(first.classification or first.agreement).samples} samples)\n")
    click.echo("\n".join(evaluation_table(stages)))


@main.command(name="profile-host")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Profile YAML to write.")
@click.option("--threads", type=int, default=None, help="Threads to measure with (default: torch's current count).")
@click.option("--quick", is_flag=True, help="Fewer repetitions (seconds instead of tens of seconds).")
@_handle_errors
def profile_host(output: Path, threads: int | None, quick: bool) -> None:
    """Measure this machine (matmul peaks per dtype, memory bandwidth, per-op overhead) into a profile YAML."""
    from effopt.hardware_profiles.host import measure_host_details, profile_to_yaml
    from effopt.optimizer.measure.bench_artefacts import _write_atomic

    m = measure_host_details(threads=threads, quick=quick)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(output, profile_to_yaml(m.profile, m.notes))
    p = m.profile
    peaks = ", ".join(f"{d} {p.peak(d) / 1e9:.1f} G/s" for d in p.supported_dtypes)
    click.echo(f"{output}: {peaks}; memory {p.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s; "
               f"op overhead {p.op_overhead_s * 1e6:.2f} µs")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--artifact", type=click.Path(path_type=Path), help="Artefact folder (default: the recipe's output.dir).")
@click.option("--batches", default="1,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--runs", default=30, show_default=True, help="Timed runs per runtime and batch.")
@click.option("--warmup", default=5, show_default=True, help="Untimed warm-up runs.")
@click.option("--threads", default=1, show_default=True, help="Threads for torch and onnxruntime.")
@click.option("--profile", "profile_name", help="Profile for predictions (default: measure this host now).")
@_handle_errors
def bench(source: Path, artifact: Path | None, batches: str, runs: int, warmup: int, threads: int,
          profile_name: str | None) -> None:
    """Measured vs predicted latency of the original and each artefact; appended to the report.

    SOURCE is a recipe (the original model is timed too) or an artefact folder.
    """
    from effopt.optimizer.measure.bench_artefacts import append_to_report, load_bench_profile, run_bench, specs_from_report
    from effopt.optimizer.compiler import prepare

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError as e:
        raise RecipeError(f"--batches {batches!r}: expected comma-separated integers like 1,32") from e
    if source.is_dir():
        folder, model, ir, specs, seed = source, None, None, specs_from_report(source), 0
    else:
        prepared = prepare(source)
        r = prepared.loaded.recipe
        folder = artifact or prepared.loaded.resolve(r.output.dir)
        model, ir, specs, seed = prepared.model, prepared.ir, prepared.ir.inputs, r.seed
    profile = load_bench_profile(profile_name, threads)
    result = run_bench(model, ir, specs, folder, sizes, runs, warmup, threads, profile, seed)
    append_to_report(folder, result)
    click.echo(result.table())


@main.command()
@_handle_errors
def passes() -> None:
    """List the registered passes and their options."""
    from effopt.optimizer.report.tables import passes_table

    click.echo(passes_table())


if __name__ == "__main__":
    main()
