"""Help and spelling for the command line: `--help` that lists every config key, flags and keys accepted with dashes
or underscores, and compact JSON summaries. Kept apart from cli.py's verbs; nothing here imports torch until a
verb's `--help` asks for the algorithms' settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class ConfigHelpParser(argparse.ArgumentParser):
    """A verb's parser whose --help also lists every config key it accepts as --section.key=VALUE: its meaning (the
    field's comment in the source), its allowed values and its default. Read from the source files, not imported:
    the algorithms import torch, and `--help` answers in well under a second without it."""

    config_cls: str = ""  # "train" or "pipeline"

    def format_help(self) -> str:
        if not self.config_cls:
            return super().format_help()
        from sslfw.config import Config, describe_keys

        if self.config_cls == "pipeline":
            from sslfw.commands.pipeline_config import PipelineConfig

            rows, title = describe_keys(PipelineConfig), "pipeline keys"
        else:
            rows, title = describe_keys(Config), "config keys"
        meaning = {**field_comments(Path(__file__).with_name("config.py"))}
        if self.config_cls == "pipeline":
            meaning |= field_comments(Path(__file__).parent / "commands" / "pipeline_config.py")
        lines = [_key_line(k, t, d, meaning.get((owner, k.rsplit(".", 1)[-1]), "")) for k, t, d, owner in rows]
        if self.config_cls == "train":
            by_key: dict[str, list[str]] = {}  # KEY -> "algorithm default" of the algorithms that have it
            what: dict[str, str] = {}
            for algo, params in sorted(algorithm_params().items()):
                for key, (kind, default, comment) in params.items():
                    by_key.setdefault(f"{key}=VALUE  ({kind}", []).append(f"{algo} {default}")
                    what[key] = what.get(key) or (f"{comment} ({algo})" if comment else "")
            for key, uses in by_key.items():
                name = key.split("=")[0]
                lines.append(f"  --algorithm.params.{key}; default per algorithm: {', '.join(uses)})")
                if what[name]:
                    lines.append(f"      {what[name]}")
        extra = "\n".join(lines)
        how = "override any with --key=value; dashes or underscores; a bare flag means true"
        return f"{super().format_help()}\n{title} ({how}):\n{extra}\n"


def _key_line(key: str, kind: str, default: str, meaning: str) -> str:
    if kind.startswith("Literal["):
        kind = "one of " + " | ".join(v.strip(" '") for v in kind[8:-1].split(","))
    line = f"  --{key}=VALUE  ({kind}, default {default})"
    return f"{line}\n      {meaning}" if meaning else line


def field_comments(source: Path) -> dict[tuple[str, str], str]:
    """{(class, field): its comment} for the class-level fields of a source file: the comment on the field's line,
    else the comment lines right above it (the config's documentation is its source)."""
    import ast

    text = source.read_text()
    lines = text.splitlines()
    out: dict[tuple[str, str], str] = {}
    for cls in (n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            line = lines[node.lineno - 1]
            comment = line.split("  # ", 1)[1] if "  # " in line else ""
            above, i = [], node.lineno - 2
            while not comment and i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("# "))
                i -= 1
            out[cls.name, node.target.id] = (comment or " ".join(above)).replace("fmt: skip", "").strip()
    return out


def algorithm_params() -> dict[str, dict[str, tuple[str, str, str]]]:
    """{algorithm name: {param: (type, default, comment)}} read from sslfw/algorithms/*.py without importing them:
    each registered class's `Params`, its own or inherited (a `Params(Base.Params)` adds to its base's)."""
    import ast

    from sslfw.algorithms import MODULES

    classes: dict[str, dict] = {}  # class name -> {"bases", "name", "params" (own, or None)}
    for module in MODULES:
        path = Path(__file__).parent / "algorithms" / f"{module}.py"
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.parse(text).body:
            if not isinstance(node, ast.ClassDef):
                continue
            info = {"bases": [ast.unparse(b) for b in node.bases], "name": None, "params": None, "extends": []}
            for item in node.body:
                if isinstance(item, ast.Assign) and ast.unparse(item.targets[0]) == "name":
                    info["name"] = ast.literal_eval(item.value)
                if isinstance(item, ast.ClassDef) and item.name == "Params":
                    info["extends"] = [ast.unparse(b).split(".")[0] for b in item.bases]
                    info["params"] = {
                        f.target.id: (ast.unparse(f.annotation), _yaml(ast.literal_eval(f.value)),
                                      lines[f.lineno - 1].split("  # ", 1)[1] if "  # " in lines[f.lineno - 1] else "")
                        for f in item.body if isinstance(f, ast.AnnAssign)
                    }  # fmt: skip
            classes[node.name] = info

    def params_of(cls: str) -> dict:
        info = classes.get(cls)
        if info is None:
            return {}
        if info["params"] is None:  # no Params of its own: its base class's
            return params_of(info["bases"][0]) if info["bases"] else {}
        inherited = {k: v for base in info["extends"] for k, v in params_of(base).items()}
        return inherited | info["params"]

    return {info["name"]: params_of(cls) for cls, info in classes.items() if info["name"]}


def _yaml(value) -> str:
    """One spelling for defaults, the YAML one the config files use (true, not True)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


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
