"""The ``amalab`` command.

    amalab convex-rates CONFIG [--out DIR] [--workers N] [--quiet] [--fresh]
                                                  run the convex rate reproduction (resumes if interrupted)
    amalab plot RESULTS_JSON [--out DIR]                              redraw its figures from saved results
    amalab check RESULTS_JSON                                         check saved results against the theory
    amalab list                                                       losses, algorithms and mixers known
    amalab llm run|specialists|train|eval CONFIG [--out DIR] [--quiet]
                                                  the LLM experiment (needs the llm extra)
    amalab llm export RUN_DIR OUT_DIR [--force]                       a run as a transformers model folder
    amalab llm export EXPERIMENT_DIR OUT_DIR --method M --seed S      the same, a generalist chosen by method, seed
    amalab diagnose CONFIG... [--across DIR] [--quiet] [--selection]
                                                  the MuJoCo diagnostic suite, one config per body (mujoco extra)

Exit status of the convex commands: 0 success (every theory check passed); 1 a theory check failed;
2 invalid input (config, results file, output folder), reported as one line; 130 interrupted (Ctrl-C;
finished jobs are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import threading
from pathlib import Path

from amalab.convex.algorithms import ALGORITHMS
from amalab.convex.config import load_reproduction_config
from amalab.convex.exp3_regret import SEQUENCES
from amalab.convex.figures import make_rate_figures
from amalab.convex.losses import LOSSES
from amalab.convex.reproduction import run_reproduction
from amalab.convex.results_io import compare_results, load_results, locked_output_folder, write_results
from amalab.convex.theory_checks import check_results, failures
from amalab.errors import ConfigError

# The llm and diagnose commands import their packages inside the command, after checking the optional extra
# they need (llm: torch and transformers; diagnose: mujoco): `amalab convex-rates` and the other convex
# commands work on a base install. These are the only imports inside functions.


def _convex_rates(args) -> int:
    config = load_reproduction_config(args.config)
    if args.workers is not None:
        if args.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {args.workers}")
        config = dataclasses.replace(config, workers=args.workers)
    out = Path(args.out or config.out)
    with locked_output_folder(out):
        checkpoints = out / ".jobs"
        if args.fresh and checkpoints.exists():
            shutil.rmtree(checkpoints)
        try:
            record = run_reproduction(config, show_progress=not args.quiet, checkpoint_dir=checkpoints)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping already: a second Ctrl-C changes nothing
            saved = len(list(checkpoints.glob("*.json"))) if checkpoints.is_dir() else 0
            print(f"amalab: interrupted; {saved} finished jobs are kept in {checkpoints}: rerun the same command "
                  "to resume", file=sys.stderr)
            return 130
        paths = write_results(record, out) + make_rate_figures(record, out)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the results are written: the next run starts afresh
    print(f"finished in {record['elapsed_s']:.1f} s; wrote:")
    for p in paths:
        print(f"  {p}")
    committed = Path(config.compare_with) if config.compare_with else None
    if committed is not None and committed.resolve() != out.resolve():
        print(f"compared with the committed results in {committed}:")
        for line in compare_results(out, committed):
            print(f"  {line}")
    return _report(check_results(record))


def _report(checks) -> int:
    """Print every check with its gate and result; exit status 0 if all pass, 1 otherwise."""
    print("theory checks (gates from the results' [checks] config):")
    for check in checks:
        print(f"  {check.line()}")
    failed = failures(checks)
    if failed:
        print(f"theory checks FAILED: {len(failed)} of {len(checks)}")
        return 1
    print(f"theory checks passed: all {len(checks)}")
    return 0


def _plot(args) -> int:
    results = Path(args.results)
    record = load_results(results)
    out = Path(args.out) if args.out else results.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot write the output folder: {e.strerror or e}") from None
    for p in make_rate_figures(record, out):
        print(p)
    return 0


def _check(args) -> int:
    return _report(check_results(load_results(args.results)))


def _list(args) -> int:
    print("losses:     " + ", ".join(LOSSES))
    print("algorithms:")
    for name, text in ALGORITHMS.items():
        print(f"  {name:<11} {text}")
    print("EXP3 gain sequences:")
    for name, text in SEQUENCES.items():
        print(f"  {name:<11} {text}")
    return 0


def _llm_extra() -> None:
    """Refuse, in one line, an llm command on an install without the llm extra."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"the LLM module needs the llm extra ({e}); see the README's install section") from None


def _llm(args) -> int:
    _llm_extra()
    from amalab.llm.cli import run_llm_command  # the llm extra: imported once it is known to be installed

    return run_llm_command(args.stage, args.config, show_progress=not args.quiet, out=args.out)


def _llm_export(args) -> int:
    _llm_extra()
    from amalab.llm.export import export_run, select_run  # the llm extra, as above

    info = export_run(select_run(Path(args.source), args.method, args.seed), Path(args.out), force=args.force)
    print(f"exported {info['name']} (step {info['step']}, {info['run']}) to {args.out}")
    return 0


def _diagnose(args) -> int:
    try:
        import gymnasium  # noqa: F401
        import mujoco  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"the diagnostic suite needs the mujoco extra ({e}): pip install -e '.[mujoco]' "
                          "(torch first, the build for your machine)") from None
    from amalab.control.config import load_diagnose_config
    from amalab.control.diagnose import diagnose
    from amalab.control.selection import select

    configs = [load_diagnose_config(path) for path in args.config]
    if args.selection:
        return max(0 if all(select(config, show_progress=not args.quiet)["scaled"]) else 1 for config in configs)
    summaries = {Path(path).stem: diagnose(config, show_progress=not args.quiet)  # a body: its config's name
                 for path, config in zip(args.config, configs)}
    if args.across:
        from amalab.control.across_bodies import write_across_bodies

        write_across_bodies(summaries, Path(args.across))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amalab", description="Multi-task preference alignment with AMA.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convex-rates", help="run the convex rate reproduction (results, figures, checks)")
    p.add_argument("config", help="TOML config, e.g. experiments/convex_rates/config.toml")
    p.add_argument("--out", help="output directory (default: the config's `out`, runs/convex_rates)")
    p.add_argument("--workers", type=int, help="worker processes (default: the config's; 0 = one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fresh", action="store_true",
                   help="ignore the jobs an interrupted run left in OUT/.jobs (by default they are reused)")
    p.set_defaults(run=_convex_rates)
    p = sub.add_parser("plot", help="redraw the figures from a saved results.json")
    p.add_argument("results")
    p.add_argument("--out", help="output directory (default: next to the results file)")
    p.set_defaults(run=_plot)
    p = sub.add_parser("check", help="check a saved results.json against the theory")
    p.add_argument("results")
    p.set_defaults(run=_check)
    p = sub.add_parser("list", help="list the losses, algorithms and gain sequences")
    p.set_defaults(run=_list)
    p = sub.add_parser("llm", help="multi-task preference training of causal LMs (the llm extra)")
    stages = p.add_subparsers(dest="stage", required=True)
    for stage, text in (("run", "everything"), ("specialists", "caches and specialists"),
                        ("train", "generalists (and what they need)"),
                        ("eval", "re-evaluate finished runs, summary and figures")):
        s = stages.add_parser(stage, help=text)
        s.add_argument("config", help="TOML config, e.g. experiments/llm_tiny/config.toml")
        s.add_argument("--out", help="run directory (default: the config's `out`)")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        s.set_defaults(run=_llm)
    s = stages.add_parser("export", help="a run as a transformers model folder (LoRA merged; tokenizer)")
    s.add_argument("source", help="a run folder (summary.csv's run_dir), or an experiment folder with "
                                  "--method/--seed")
    s.add_argument("out", help="the model folder to write")
    s.add_argument("--method", help="in an experiment folder: the generalist's method")
    s.add_argument("--seed", type=int, help="in an experiment folder: the generalist's seed index")
    s.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    s.set_defaults(run=_llm_export)
    p = sub.add_parser("diagnose", help="the MuJoCo diagnostic suite: every method and merge, many seeds, true "
                                        "returns (the mujoco extra); resumes if interrupted")
    p.add_argument("config", nargs="+", help="TOML config(s), one per body, e.g. "
                                             "experiments/mujoco_diagnostic/halfcheetah.toml")
    p.add_argument("--across", metavar="DIR", help="with several bodies: write across_bodies.md and .json there")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--selection", action="store_true",
                   help="check the settings on seeds the comparison never uses: references and specialists only; "
                        "exit 1 unless every task's specialists beat the reference (amalab/control/selection.py)")
    p.set_defaults(run=_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"amalab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping already: a second Ctrl-C changes nothing
        print("amalab: interrupted", file=sys.stderr)
        return 130
    finally:
        # As the program (argv from the command line) a stopping run keeps ignoring Ctrl-C until it exits;
        # called with explicit arguments (a test, a notebook) it gives the caller its Ctrl-C back.
        if argv is not None and sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)


if __name__ == "__main__":
    sys.exit(main())
