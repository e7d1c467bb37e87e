"""`sslfw` command line: one verb per job. Heavy imports happen inside each verb so `--help` stays fast."""

from __future__ import annotations

import argparse
import sys
import time
import typing
from pathlib import Path

from sslfw.config import Crops, Weights, parse_config


def cmd_synth(a: argparse.Namespace) -> dict:
    from sslfw.data.distortions import DEFAULT_MIX
    from sslfw.data.frmetrics import MOS_KNOTS_Q
    from sslfw.data.synth import SynthConfig, calibrate, synthesize

    cfg = SynthConfig(
        out=a.out,
        koniq_count=a.koniq_count,
        kadis_count=a.kadis_count,
        extra_count=a.extra_count,
        width=a.width,
        height=a.height,
        seed=a.seed,
        workers=a.workers,
        distortions=tuple(int(x) for x in a.distortions.split(",")) if a.distortions else DEFAULT_MIX,
    )
    if a.calibrate:
        return {"fr_quality_quantiles": calibrate(cfg), "current_knots": list(MOS_KNOTS_Q)}
    return {"out": str(a.out), **synthesize(cfg), "details": str(Path(a.out) / "synth_truth.csv")}


def cmd_prepare(a: argparse.Namespace) -> dict:
    from sslfw.data.importers import import_sources
    from sslfw.data.manifest import prepare

    found = import_sources(
        koniq={"root": a.koniq, "image_dir": a.koniq_images} if a.koniq else None,
        ratings={"csv_path": a.ratings, "images": a.images, "image_column": a.image_column,
                 "score_column": a.score_column, "score_range": a.score_range} if a.ratings else None,
        extra={"csv_path": a.extra_labels, "kadis_root": a.kadis} if a.extra_labels else None,
        kadis={"root": a.kadis} if a.kadis else None,
    )  # fmt: skip
    meta = prepare(found, a.out, a.bins, a.split, a.seed, a.koniq_sets, a.labelled_fraction)
    short = ("counts", "class_shares")  # the rest (sources, split, label scheme) is in meta.json
    return {"out": str(a.out), **{k: meta[k] for k in short}, "details": str(Path(a.out) / "meta.json")}


def cmd_pack(a: argparse.Namespace) -> dict:
    from sslfw.data.shards import pack

    index = pack(
        a.manifest,
        a.out,
        samples_per_shard=a.samples_per_shard,
        max_side=a.max_side,
        seed=a.seed,
        workers=a.workers,
        progress=not a.quiet,
        pixels=a.pixels,
    )
    summary = {
        name: {"samples": s["count"], "shards": len(s["shards"]), "class_counts": s["class_counts"]}
        for name, s in index["sets"].items()
    }
    summary["skipped"] = index["skipped"]
    return {"out": str(a.out), **summary, "details": str(Path(a.out) / "index.json")}


def cmd_verify(a: argparse.Namespace) -> dict:
    from sslfw.data.shards import verify

    return verify(a.dir)


def cmd_train(a: argparse.Namespace) -> dict:
    from sslfw.runconfig import load_config
    from sslfw.train import train

    overrides = list(a.overrides) + ([f"--ckpt.resume={a.resume}"] if a.resume else [])
    return train(load_config(a.config, overrides))


def cmd_pseudolabel(a: argparse.Namespace) -> dict:
    if a.teacher == "reference" or a.checkpoint is None:  # the classical model fit on the pack's labels
        from sslfw.commands.teacher import reference_pseudolabel

        return reference_pseudolabel(a.shards, a.out, a.checkpoint, a.teacher)
    from sslfw.commands.pseudolabel import pseudolabel

    return pseudolabel(
        a.checkpoint,
        a.out,
        shards=a.shards,
        weights=a.weights,
        crops=a.crops,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        chunk=a.chunk,
        progress=not a.quiet,
    )


def cmd_eval(a: argparse.Namespace) -> dict:
    from sslfw.commands.evaljob import run_eval

    result = run_eval(
        a.checkpoint,
        a.split,
        a.weights,
        a.crops,
        out=a.out,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        shards=a.shards,
    )
    return result | ({"details": str(Path(a.out) / "eval.json")} if a.out else {})


def cmd_predict(a: argparse.Namespace) -> None:
    from sslfw.commands.predict import predict_files

    crops = 0 if a.crops == "all" else int(a.crops)  # all: the whole-image tiles, eval's --crops 0
    t0 = time.perf_counter()
    summary = predict_files(a.checkpoint, a.inputs, a.out, a.weights, crops, a.batch_size, a.device, not a.quiet)
    print(
        f"[predict] scored {summary['scored']}, skipped {summary['skipped']} -> {summary['out']} "
        f"in {time.perf_counter() - t0:.1f}s with {summary['checkpoint']}",
        file=sys.stderr,
    )


def _print_report(result: dict) -> dict:
    """A pipeline's report goes to stdout as markdown; the rest of its result is the usual JSON summary."""
    if result.get("report_text"):
        print(result.pop("report_text"))
    return result


def cmd_pipeline(a: argparse.Namespace) -> dict:
    from sslfw.commands.pipeline import PipelineConfig, run_pipeline

    return _print_report(run_pipeline(parse_config(a.config, a.overrides, cls=PipelineConfig)))


def cmd_demo(a: argparse.Namespace) -> dict:
    from sslfw.commands.demo import run_demo

    return _print_report(run_demo(a.config, a.seed, a.overrides, a.data, a.shards))


def cmd_bench(a: argparse.Namespace) -> dict:
    from sslfw.bench.run import run_bench

    return run_bench(a)


def _inference_args(s: argparse.ArgumentParser, whole: bool = False, required: bool = True) -> None:
    s.add_argument("--checkpoint", type=Path, required=required,
                   help="a step-N directory, a run directory (newest), or RUN/best (best val SRCC kept)")  # fmt: skip
    s.add_argument("--weights", default="ema", choices=typing.get_args(Weights), help="the EMA teacher or the student")
    if whole:  # predict: whole photos by default
        s.add_argument("--crops", default="all", choices=("all", *map(str, typing.get_args(Crops))),
                       help="all (or 0): tiles covering the whole image at native resolution, averaged (default); "
                       "1: centre; 5: centre + corners (as sslfw eval)")  # fmt: skip
    else:
        s.add_argument("--crops", type=int, default=1, choices=typing.get_args(Crops),
                       help="1: centre; 5: centre + corners; 0: tiles covering the whole image (as predict's "
                       "default); averaged")  # fmt: skip


def cmd_config(a: argparse.Namespace) -> None:
    import yaml

    from sslfw.config import to_dict
    from sslfw.runconfig import load_config

    print(yaml.safe_dump(to_dict(load_config(a.config, a.overrides)), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    from sslfw import __version__
    from sslfw.cli_help import ConfigHelpParser, at_least_0, floats, positive

    p = argparse.ArgumentParser(prog="sslfw", description=__doc__)
    p.add_argument("--version", action="version", version=f"sslfw {__version__}")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=ConfigHelpParser)

    data = verbs.add_parser("data", help="make or import datasets").add_subparsers(dest="action", required=True)
    s = data.add_parser("synth", help="write the embedded dataset in KonIQ/KADIS layouts (no download)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--koniq-count", type=positive, default=1200, help="labelled images (KonIQ layout)")
    s.add_argument("--kadis-count", type=positive, default=2400, help="unlabelled pool images (KADIS layout)")
    s.add_argument("--extra-count", type=at_least_0, default=48, help="hand-labelled pool images (the paper had 359)")
    s.add_argument("--width", type=positive, default=128)
    s.add_argument("--height", type=positive, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="processes; 0 = one per core (output does not change)")
    s.add_argument(
        "--distortions",
        help="KADID distortion codes to draw from (default: the structural ones, sslfw/data/distortions.py)",
    )
    s.add_argument("--calibrate", action="store_true", help="print the fr_quality quantiles behind the MOS map")
    s.set_defaults(func=cmd_synth)

    s = data.add_parser("prepare", help="read KonIQ/KADIS layouts or any rated images into a validated, split manifest")
    s.add_argument("--koniq", type=Path, help="folder with koniq10k_scores_and_distributions.csv")
    s.add_argument("--ratings", type=Path, help="any csv of ratings (SPAQ, LIVE-itW, your own): one image per row")
    s.add_argument("--images", type=Path, help="folder the --ratings image names are in (default: the csv's)")
    s.add_argument("--image-column", default="image", help="--ratings column naming the image file")
    s.add_argument("--score-column", default="score", help="--ratings column holding the score (higher = better)")
    s.add_argument("--score-range", type=floats, help="LOW,HIGH ends of the score scale (default: the file's min, max)")
    s.add_argument("--kadis", type=Path, help="folder with ref_imgs/ (the unlabelled pool)")
    s.add_argument("--extra-labels", type=Path, help="csv image_name,label[,MOS] of hand-labelled images")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--bins", help="MOS edges '1.79,2.55,3.46,3.94' (default, KonIQ) or 'quantile:2,13,49,33,2'")
    s.add_argument("--split", type=floats, default=(0.8, 0.1, 0.1), help="train,val,test fractions (stratified)")
    s.add_argument(
        "--labelled-fraction",
        type=float,
        default=1.0,
        help="keep this share of the train split labelled; the rest joins the unlabelled pool",
    )
    s.add_argument("--koniq-sets", type=Path, help="koniq10k_distributions_sets.csv: use KonIQ's official split")
    s.add_argument("--koniq-images", help="image folder inside --koniq (default: 1024x768, else 512x384)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_prepare)

    shards = verbs.add_parser("shards", help="WebDataset shards").add_subparsers(dest="action", required=True)
    s = shards.add_parser("pack", help="pack a manifest into tar shards + index.json")
    s.add_argument("--manifest", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--samples-per-shard", type=int, default=256)
    s.add_argument("--max-side", type=int, help="downscale larger images (re-encodes them: changes quality)")
    s.add_argument(
        "--pixels",
        default="original",
        choices=("original", "raw", "zstd"),
        help="raw: decoded RGB pixels (.npy), lossless, nothing left to decode (3x a PNG's disk); zstd: the same "
        "pixels in zstd row blocks, ~10x PNG's decode rate at ~1.5x its size (BENCHMARKS.md)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_pack)

    s = shards.add_parser("verify", help="check every shard's size and sha256 against index.json")
    s.add_argument("dir", type=Path, help="a packed folder (index.json)")
    s.set_defaults(func=cmd_verify)

    s = verbs.add_parser("train", help="train (any algorithm) with the config file and --section.key=value overrides")
    s.add_argument("--config", type=Path, help="YAML config; omitted sections keep their defaults")
    s.add_argument("--resume", help="auto | none | a step-N directory (same as --ckpt.resume)")
    s.set_defaults(func=cmd_train)
    s.config_cls = "train"

    s = verbs.add_parser("config", help="print the resolved training config (file + overrides) as YAML")
    s.add_argument("action", choices=("show",))
    s.add_argument("--config", type=Path, help="YAML config; omitted sections keep their defaults")
    s.set_defaults(func=cmd_config)
    s.config_cls = "train"

    s = verbs.add_parser("pseudolabel", help="label the unlabelled shards with a checkpoint (distributed, resumable)")
    _inference_args(s, required=False)
    s.add_argument("--teacher", choices=("checkpoint", "reference"), default="checkpoint",
                   help="checkpoint: the trained network; reference: the classical features + ridge model fit on "
                   "the pack's labels (no checkpoint; --shards required)")  # fmt: skip
    s.add_argument("--out", type=Path, required=True, help="csv to write (chunks go to OUT.parts/)")
    s.add_argument("--shards", type=Path, help="packed folder (default: the checkpoint's data.shards)")
    s.add_argument("--batch-size", type=positive, default=64)
    s.add_argument("--num-workers", type=at_least_0, default=2)
    s.add_argument("--chunk", type=positive, default=1024, help="samples per resumable unit")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_pseudolabel)

    s = verbs.add_parser("eval", help="evaluate a checkpoint on a split (distributed); JSON, markdown, confusion PNG")
    _inference_args(s)
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--out", type=Path, help="folder for eval.json, eval.md, confusion.png")
    s.add_argument("--shards", type=Path)
    s.add_argument("--batch-size", type=positive, default=64)
    s.add_argument("--num-workers", type=at_least_0, default=2)
    s.set_defaults(func=cmd_eval)

    s = verbs.add_parser("predict", help="quality level and score per image, as CSV")
    _inference_args(s, whole=True)
    s.add_argument("inputs", type=Path, nargs="+", help="image files and/or folders")
    s.add_argument("--out", type=Path, help="csv file (default: stdout)")
    s.add_argument("--batch-size", type=positive, default=32, help="views per forward pass")
    s.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_predict)

    s = verbs.add_parser("pipeline", help="SSL -> pseudo-label -> retrain -> eval for algorithms x seeds; report")
    s.add_argument("--config", type=Path, help="pipeline YAML (sslfw/commands/pipeline.py: PipelineConfig)")
    s.set_defaults(func=cmd_pipeline)
    s.config_cls = "pipeline"
    s = verbs.add_parser(
        "demo",
        help="the README's main job: build the few-label embedded benchmark for a data seed, run the pipeline on it",
    )
    s.add_argument("--seed", type=int, default=0, help="data seed: which embedded dataset (training seeds: --seeds)")
    s.add_argument("--config", type=Path, default=Path("configs/pipeline_embedded.yaml"), help="pipeline YAML")
    s.add_argument("--data", type=Path, default=Path("data/demo"), help="where the generated images go")
    s.add_argument("--shards", type=Path, default=Path("shards"), help="where the packed shards go")
    s.set_defaults(func=cmd_demo)
    s.config_cls = "pipeline"
    s = verbs.add_parser("bench", help="throughput against its limit or alternative, as ratios (BENCHMARKS.md)")
    s.add_argument(
        "what",
        help="data, augment, step, speedups, pseudolabel (comma-separated) or all; usb: sslfw vs USB's step; "
        "compare: --before/--after bench.json folders",
    )
    s.add_argument("--config", type=Path, help="training YAML: model, batch, augmentation, algorithm settings")
    s.add_argument("--shards", type=Path, help="packed folder (default: the config's data.shards)")
    s.add_argument("--reps", type=int, default=5, help="repetitions; tables report medians")
    s.add_argument("--steps", type=int, default=5, help="steps per repetition (augment, step, speedups)")
    s.add_argument("--compile", action="store_true", help="speedups: also time torch.compile (compiles first)")
    s.add_argument("--batches", type=int, default=20, help="batches per repetition (data)")
    s.add_argument(
        "--batch", type=int, help="batch size (data: default train.batch_size; pseudolabel: data.eval_batch_size)"
    )
    s.add_argument("--workers", default="0,1,2", help="loader worker counts to compare (data)")
    s.add_argument("--set", default="train", choices=("train", "unlabelled"),
                   help="data: the set to stream (unlabelled: the pool's pixel format)")  # fmt: skip
    s.add_argument("--algorithms", default="supervised,fixmatch,adamatch,freematch,comatch,simmatch,crmatch")
    s.add_argument("--chunk", type=int, default=1024, help="pseudolabel chunk size, as in `sslfw pseudolabel`")
    s.add_argument("--limit", type=int, default=0, help="pseudolabel at most this many pool images (0: all)")
    s.add_argument("--before", help="compare: comma-separated --out folders of the earlier version")
    s.add_argument("--after", help="compare: comma-separated --out folders of this version")
    s.add_argument("--out", type=Path, help="folder for bench.json and bench.md")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one verb; the exit code is also left in $SSLFW_EXIT_FILE, since launchers replace it with their own."""
    from sslfw.preempt import write_exit_file

    try:
        try:
            code = _run(argv)
        except SystemExit as e:  # argparse errors and stages that stop a pipeline (preempted, diverged)
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except Exception:
            write_exit_file(1)
            raise
        dist = sys.modules.get("torch.distributed")  # never imported by --help, --version, data verbs
        if dist is not None and dist.is_initialized():  # an undestroyed gloo group can abort the process at exit
            dist.destroy_process_group()
    except KeyboardInterrupt:  # a second Ctrl-C, wherever it lands: abort at once, no traceback
        print("\nsslfw: interrupted", file=sys.stderr)
        code = 130
    write_exit_file(code)
    return code


def one_line(e: Exception) -> str:
    """The message of an input error, also when a DataLoader worker raised it (then torch wraps it in a traceback:
    its last line is `module.Class: message`)."""
    text = str(e).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1]
        head, _, rest = text.partition(": ")
        text = rest if rest and head.rsplit(".", 1)[-1] in ("DataError", "ConfigError", "FileNotFoundError") else text
    return text


def _run(argv: list[str] | None) -> int:
    from sslfw.cli_help import compact_json, dashed, headline
    from sslfw.errors import ConfigError, DataError

    # Flags are spelt with dashes (--batch-size), config keys with underscores (--run_dir): accept either in both.
    argv = [dashed(a) for a in (sys.argv[1:] if argv is None else argv)]
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.verb not in ("train", "config", "pipeline", "demo", "bench"):
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    t0 = time.perf_counter()
    try:
        result = args.func(args)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"sslfw: error: {one_line(e)}", file=sys.stderr)
        return 2
    if result is None:
        return 0
    from sslfw.dist import is_main_process

    if is_main_process():  # only the global main process reports
        print(compact_json(headline(result)))
        name = " ".join(filter(None, (args.verb, getattr(args, "action", ""))))
        print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return int(result.get("exit_code", 0))  # every process returns the job's code (train, pseudolabel)


if __name__ == "__main__":
    sys.exit(main())
