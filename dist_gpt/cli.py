"""What every launch script shares: `--config`/`--help`/`--debug` handling and one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_gpt.config import CLIP, Config, help_text, load_config, shorten
from dist_gpt.errors import UserError


def main(fn: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run `fn(args)`; a UserError becomes one line on stderr and exit code 2.

    `--debug` (or DIST_GPT_DEBUG=1) shows the full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DIST_GPT_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        fn(args)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(str(e))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def one_line(message: str, limit: int = 1000) -> str:
    """A message as one line of at most `limit` characters (a wrapped library message, a huge quoted value)."""
    return shorten(" ".join(message.split()), limit)


class ArgParser(argparse.ArgumentParser):
    """argparse for the launch scripts' own flags: a bad argument raises UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{shorten(message, 2 * CLIP)} (see --help)")  # argparse quotes the user's values


def config_path(name: str) -> str:
    """A shipped config (`configs/NAME`), found from the working directory or from the repository holding this package."""
    local = Path("configs") / name
    return str(local if local.is_file() else Path(__file__).resolve().parents[1] / "configs" / name)


def parse_stage_args(args: list[str], stage: str, usage: str, default_config: str | None = None) -> Config:
    """`[--config FILE ...] [--section.key=value ...]` for a stage; `--help` prints usage and every key.

    Several `--config` files merge in order: a later file overrides an earlier one, key by key, and the
    `--section.key=value` overrides win over all files. `default_config` applies only without any --config.
    """
    if "-h" in args or "--help" in args:
        print(
            usage.strip()
            + "\n\n"
            + CONFIG_HELP
            + "\n\nconfig keys (--section.key=value, default shown):"
            + help_text(stage)
        )
        sys.exit(0)
    config_files: list[str] = []
    rest = []
    i = 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UserError("--config needs a file: --config configs/NAME.yaml")
            config_files.append(args[i + 1])
            i += 2
        elif args[i].startswith("--config="):
            config_files.append(args[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(args[i])
            i += 1
    if any(not f for f in config_files):
        raise UserError("--config needs a file: --config configs/NAME.yaml")
    return load_config(config_files or ([default_config] if default_config else []), rest, stage)


CONFIG_HELP = """\
--config FILE may be given more than once: the files merge in order (a later file overrides an earlier
one, key by key), then the --section.key=value overrides win. A key given twice in one file is an error."""
