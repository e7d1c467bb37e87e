"""Help and spelling for the command line: `--help` that lists every config key, flags and keys accepted with dashes
or underscores, and compact JSON summaries. Kept apart from cli.py's verbs; nothing here imports torch until a
verb's `--help` asks for the algorithms' settings."""

from __future__ import annotations

import argparse
import json
import re


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


def compact_json(result: dict) -> str:
    """The command's summary as JSON, with lists of plain values on one line (class counts, not one per line)."""
    text = json.dumps(result, indent=1, default=str)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)


def dashed(arg: str) -> str:
    """--batch_size=3 -> --batch-size=3 (the value is left alone); config overrides turn back into underscores."""
    if not arg.startswith("--"):
        return arg
    key, eq, value = arg.partition("=")
    return key.replace("_", "-") + eq + value
