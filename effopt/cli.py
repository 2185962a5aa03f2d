"""The ``effopt`` command. Exit codes: 0 ok, 1 verification failed, 2 bad input, 3 internal error, 130 Ctrl-C.

The CLI owns the terminal: library code returns values and raises typed
errors; only this module prints, and `exit_code_for` is the one place errors
become exit codes. A Ctrl-C ends every command with ``effopt: interrupted`` and
exit 130 (the shell's code for SIGINT), never click's ``Aborted!`` with exit 1,
which would read as "verification failed".
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

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def exit_code_for(error: BaseException) -> int:
    if _interrupted(error):
        return EXIT_INTERRUPTED
    return error.exit_code if isinstance(error, EffoptError) else EXIT_INTERNAL


def _interrupted(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C, or was raised while one was being handled (torch's clean-up failing
    after an interrupt: ``AttributeError: module 'torch._dynamo' has no attribute 'guards'``)."""
    pending, seen = [error], []
    while pending:
        e = pending.pop()
        if isinstance(e, KeyboardInterrupt):
            return True
        if not any(e is s for s in seen):
            seen.append(e)
            pending += [c for c in (e.__cause__, e.__context__) if c is not None]
    return False


def _exit_interrupted() -> None:
    click.echo("effopt: interrupted", err=True)
    sys.exit(EXIT_INTERRUPTED)


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
        except KeyboardInterrupt:
            _exit_interrupted()
        except EffoptError as e:
            if _interrupted(e):
                _exit_interrupted()
            click.echo(f"effopt: error: {e}", err=True)
            sys.exit(exit_code_for(e))
        except Exception as e:  # a bug in effopt: say so, keep the traceback for the bug report
            if _interrupted(e):
                _exit_interrupted()
            traceback.print_exc()
            click.echo(f"effopt: internal error: {type(e).__name__}: {e} (please report this)", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


class _Main(click.Group):
    """click's standalone mode turns Ctrl-C into "Aborted!" and exit 1; run it non-standalone and map it to 130."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except (click.exceptions.Abort, KeyboardInterrupt):  # click raises Abort for a Ctrl-C in parsing
            _exit_interrupted()
        except click.ClickException as e:  # usage errors: click's message and exit 2
            e.show()
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else EXIT_OK)  # --help and --version return 0


@click.group(cls=_Main)
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
@click.option("--force", is_flag=True, help="Write into a folder effopt did not create: replace only effopt's own "
              "files there (model.*, report.*), never remove anything else.")
@_handle_errors
def compile_cmd(recipe: Path, output: Path | None, force: bool) -> None:
    """Optimize, verify and emit artefacts + report; exit 0 only if verification passed.

    The output folder is checked first: effopt replaces only a folder it wrote itself
    (it holds a .effopt-output marker); anything else is refused (exit 2) unless --force.
    """
    from effopt.optimizer.compiler import compile as run_compile

    result = run_compile(recipe, output_dir=output, force=force)
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
@click.option("--artifact", type=click.Path(path_type=Path),
              help="Artefact folder: model.pt2, model_aoti.pt2, model_int8.pt, model.onnx, model_float.onnx, "
                   "each scored when present (default: output.dir).")
@_handle_errors
def evaluate(recipe: Path, artifact: Path | None) -> None:
    """Metrics of the original model and of each emitted artefact on the recipe's data.eval."""
    from effopt.optimizer.compiler import evaluate_artefacts
    from effopt.optimizer.report.report import evaluation_table

    stages = evaluate_artefacts(recipe, artifact)
    first = stages[0].evaluation
    click.echo(f"{first.task} on {first.dataset} ({(first.classification or first.agreement).samples} samples)\n")
    click.echo("\n".join(evaluation_table(stages)))


PROFILE_SIGNATURE = "written by effopt profile-host"  # the first line of every profile-host file


@main.command(name="profile-host")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Profile YAML to write.")
@click.option("--threads", type=int, default=None, help="Threads to measure with (default: torch's current count).")
@click.option("--quick", is_flag=True, help="Fewer repetitions (seconds instead of tens of seconds).")
@_handle_errors
def profile_host(output: Path, threads: int | None, quick: bool) -> None:
    """Measure this machine (matmul peaks per dtype, memory bandwidth, per-op overhead) into a profile YAML."""
    from effopt.hardware_profiles.host import measure_host_details, profile_to_yaml
    from effopt.optimizer.emit.writer import check_output_file, write_file_atomic

    check_output_file(output, PROFILE_SIGNATURE)  # before measuring: a user's file is never overwritten
    m = measure_host_details(threads=threads, quick=quick)
    check_output_file(output, PROFILE_SIGNATURE)
    write_file_atomic(output, profile_to_yaml(m.profile, m.notes))
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
    from effopt.optimizer.emit.writer import require_effopt_output

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError as e:
        raise RecipeError(f"--batches {batches!r}: expected comma-separated integers like 1,32") from e
    if source.is_dir():
        require_effopt_output(source, "effopt bench")  # never read or append to a user's report.json
        folder, model, ir, specs, seed = source, None, None, specs_from_report(source), 0
    else:
        prepared = prepare(source)
        r = prepared.loaded.recipe
        folder = artifact or prepared.loaded.resolve(r.output.dir)
        require_effopt_output(folder, "effopt bench")
        model, ir, specs, seed = prepared.model, prepared.ir, prepared.ir.inputs, r.seed
    profile = load_bench_profile(profile_name, threads)
    result = run_bench(model, ir, specs, folder, sizes, runs, warmup, threads, profile, seed)
    require_effopt_output(folder, "effopt bench")
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
