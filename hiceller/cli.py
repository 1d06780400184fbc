"""The ``hiceller`` console script: one parser, subcommands registered by each package.

Each package's ``cli.py`` has ``register(subparsers)``, which adds its subcommands and sets
``func`` (a handler taking the parsed args and returning an exit code). A HicellerError from a
handler is the user's problem, not a bug: it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from hiceller.errors import HicellerError
from hiceller.memory import tune_malloc

__all__ = ["main", "build_parser", "run_handler", "module_main"]

# Packages whose cli.register() adds subcommands, in --help order; every one must have it.
_PACKAGES = ("data_store", "pretrain", "finetune", "cluster")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiceller",
        description="Pretrain Celler single-cell foundation models and turn them into cell-type annotators.",
    )
    from hiceller import __version__

    parser.add_argument("--version", action="version", version=f"hiceller {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own warnings and INFO lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for pkg in _PACKAGES:
        importlib.import_module(f"{pkg}.cli").register(sub)
    return parser


def quiet_libraries(verbose: bool) -> None:
    """Hide what the libraries print for their developers (torch.distributed FutureWarnings, MLflow's
    colour-coded warnings and download bars, DeepSpeed INFO), unless -v; the launcher's ranks inherit
    the choice through HICELLER_VERBOSE."""
    if verbose:
        os.environ["HICELLER_VERBOSE"] = "1"
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in ("mlflow", "umap", "sklearn", "anndata", "celltypist"):
        warnings.filterwarnings("ignore", module=rf"{module}(\..*)?")
    for name in ("DeepSpeed", "mlflow", "alembic", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_handler(args: argparse.Namespace) -> int:
    """Run a parsed command, turning user errors into one line on stderr and exit code 2."""
    try:
        return int(args.func(args) or 0)
    except HicellerError as e:
        from hiceller.progress import close_all

        close_all()
        print(f"hiceller {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hiceller {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`hiceller info | head`): stop quietly, as head's other writers do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def module_main(command: str, description: str, add_args, func, argv: list[str] | None = None) -> int:
    """`python -m <package>`: one subcommand's arguments and handler without the `hiceller` prefix,
    which is how the deepspeed launcher starts every rank (`--module pretrain`)."""
    p = argparse.ArgumentParser(prog=f"python -m {command}", description=description)
    add_args(p)
    p.set_defaults(func=func, command=command)
    tune_malloc()
    quiet_libraries(os.environ.get("HICELLER_VERBOSE") == "1")
    return run_handler(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    # Quiet the libraries that print banners at import time; our own messages say what happens.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tune_malloc()
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
