"""Help and spelling for the command line: `--help` that lists every config key, flags and keys accepted with dashes
or underscores, and compact JSON summaries. Kept apart from cli.py's verbs; nothing here imports torch until a
verb's `--help` asks for the algorithms' settings."""

from __future__ import annotations

import argparse
import json


class ConfigHelpParser(argparse.ArgumentParser):
    """A verb's parser whose --help also lists every config key it accepts as --section.key=value, with its type and
    default (built only when asked: it imports the algorithms, so `sslfw --help` stays fast)."""

    config_cls: str = ""  # "train" or "pipeline"

    def format_help(self) -> str:
        if not self.config_cls:
            return super().format_help()
        from sslfw.config import Config, describe_keys

        if self.config_cls == "pipeline":
            from sslfw.commands.pipeline import PipelineConfig

            rows, title = describe_keys(PipelineConfig), "pipeline keys"
        else:
            rows, title = describe_keys(Config), "config keys"
        lines = [f"  --{k}=VALUE  ({t}, default {d})" for k, t, d in rows if k != "algorithm.params"]
        if self.config_cls == "train":
            import dataclasses

            from sslfw.algorithms import get_algorithm
            from sslfw.algorithms.base import REGISTRY

            get_algorithm("supervised")  # imports every algorithm module, so the registry is complete
            by_key: dict[str, list[str]] = {}  # algorithm.params.KEY -> "algorithm: default" of those that have it
            for name, algo in sorted(REGISTRY.items()):
                for f in dataclasses.fields(algo.Params):
                    by_key.setdefault(f"{f.name}=VALUE  ({f.type}", []).append(f"{name} {f.default}")
            for key, uses in by_key.items():
                lines.append(f"  --algorithm.params.{key}; default per algorithm: {', '.join(uses)})")
        extra = "\n".join(lines)
        how = "override any with --key=value; dashes or underscores; a bare flag means true"
        return f"{super().format_help()}\n{title} ({how}):\n{extra}\n"


HEADLINE = ("n", "srcc", "plcc", "mae", "const_mae", "accuracy")


def headline(result: dict) -> dict:
    """What the terminal shows of a result: metric dicts cut to the headline numbers of one set of weights (EMA when
    there), rounded; per-level, calibration and the other weights' numbers are in the files the command wrote."""
    out = {}
    for key, value in result.items():
        if key in ("val", "metrics") and isinstance(value, dict) and any(m.endswith("srcc") for m in value):
            has_ema = any("/ema/" in m for m in value)
            value = {
                m: round(x, 4) if isinstance(x, float) else x
                for m, x in value.items()
                if m.rsplit("/", 1)[-1] in HEADLINE and not (has_ema and "/student/" in m)
            }
        out[key] = value
    return out


def compact_json(result: dict, width: int = 100) -> str:
    """The command's summary as JSON, each list or object on one line when it fits in `width` (a set's sizes, class
    counts), lists of plain values always on one line, so a summary reads as a few lines."""

    def render(value, indent: int) -> str:
        one = json.dumps(value, default=str, ensure_ascii=False)
        plain = isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value)
        if not isinstance(value, (list, dict)) or plain or indent + len(one) <= width:
            return one
        pad = " " * (indent + 1)
        items = (
            [f"{pad}{json.dumps(k, ensure_ascii=False)}: {render(v, indent + 1)}" for k, v in value.items()]
            if isinstance(value, dict)
            else [pad + render(v, indent + 1) for v in value]
        )
        brackets = "{}" if isinstance(value, dict) else "[]"
        return brackets[0] + "\n" + ",\n".join(items) + "\n" + " " * indent + brackets[1]

    return render(result, 0)


def dashed(arg: str) -> str:
    """--batch_size=3 -> --batch-size=3 (the value is left alone); config overrides turn back into underscores."""
    if not arg.startswith("--"):
        return arg
    key, eq, value = arg.partition("=")
    return key.replace("_", "-") + eq + value


# argparse types: a bad value is one line naming the flag (argparse's usage error, exit 2)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value


def positive(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of images, a batch, a chunk)."""
    return _whole(text, 1)


def at_least_0(text: str) -> int:
    """argparse type: a whole number >= 0 (loader workers: 0 loads in the main process)."""
    return _whole(text, 0)
