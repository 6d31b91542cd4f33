"""The ``preftune`` command: subcommands mapped to library functions, no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable

from preftune import __version__
from preftune.config import ConfigError, TrainConfig, build_config, read_yaml

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so the YAML file can fill them."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML values first, then every flag given on the command line."""
    values = read_yaml(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    if values.get("resume"):
        from preftune.checkpoint import resume_values

        values = resume_values(values)  # the run's saved config under the values given now
    return build_config(values)


def _train(args: argparse.Namespace) -> int:
    from preftune import distributed
    from preftune.faults import output_errors, preflight
    from preftune.train import train

    cfg = config_from_args(args)
    if cfg.num_processes > 1 and not distributed.launched():
        preflight(cfg)  # fail here once rather than in every process
        return distributed.relaunch(cfg.num_processes, args.argv)
    with output_errors(cfg):
        result = train(cfg)
    if distributed.is_main_process():
        print(f"run written to {result.run_dir}")
    return 0


def _register_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a policy on preference pairs",
        description="Train with DPO (or a loss of its family). Flags win over --config.",
    )
    parser.add_argument("--config", help="YAML file of config keys (any flag's name)")
    add_config_flags(parser)
    parser.set_defaults(func=_train)


def _registrars() -> list[Callable]:
    from preftune import calculator, cli_inspect, report, validate

    return [_register_train, calculator.register, cli_inspect.register, report.register,
            validate.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description="Align causal language models with DPO and its family."
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # to start more processes
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"preftune: config error: {err}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"preftune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
