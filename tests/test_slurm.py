"""The repository's sbatch scripts on a real Slurm cluster (../shared/slurm-local, started here when needed).

Jobs run the real `accelerate launch` with 2 gloo CPU processes; a stop is a real signal (scancel or one raised by
the worker), and the requeue is the script's own `scontrol requeue`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sslfw import ckpt
from sslfw.data.shards import load_index
from tests.helpers import ROOT, base_yaml, tiny_overrides

pytestmark = pytest.mark.slow  # a real Slurm cluster


def _slurm_local() -> Path:
    """$SSLFW_SLURM_LOCAL, else the first shared/slurm-local beside the checkout or a folder above it."""
    if os.environ.get("SSLFW_SLURM_LOCAL"):
        return Path(os.environ["SSLFW_SLURM_LOCAL"])
    found = [
        p / "shared" / "slurm-local" for p in ROOT.parents if (p / "shared" / "slurm-local" / "start.sh").is_file()
    ]
    return found[0] if found else ROOT.parent / "shared" / "slurm-local"


SLURM_LOCAL = _slurm_local()


def _cluster_answers() -> bool:
    return (
        shutil.which("scontrol") is not None
        and subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0
    )


@pytest.fixture(scope="module")
def slurm():
    """A running cluster: the one already up, else slurm-local's, stopped again after these tests."""
    started = False
    if not _cluster_answers():
        start = SLURM_LOCAL / "start.sh"
        if not start.is_file():
            if shutil.which("sbatch") is None:
                pytest.skip(f"no sbatch here and no {start} to start a local cluster (set SSLFW_SLURM_LOCAL)")
            pytest.fail(f"sbatch is installed but no cluster answers `scontrol ping`, and {start} is missing")
        proc = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        key, _, value = proc.stdout.strip().removeprefix("export ").partition("=")
        os.environ[key] = value  # SLURM_CONF, for the client commands below
        started = True
    yield
    if started:
        subprocess.run(["bash", str(SLURM_LOCAL / "stop.sh")], capture_output=True, timeout=300)


def submit(script: str, args: list[str], cwd: Path, sbatch: list[str], env: dict | None = None) -> str:
    env = {
        **os.environ,
        "SSLFW_ROOT": str(ROOT),
        "SSLFW_VENV": sys.prefix,
        "SSLFW_CPU": "1",
        "WANDB_MODE": "offline",
        **(env or {}),
    }
    proc = subprocess.run(
        ["sbatch", "--parsable", "--gres=gpu:0", "-o", "job.out", *sbatch, str(ROOT / "slurm" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def show(job: str) -> dict:
    """`scontrol show job` as a dict; {} when the controller did not answer (under load it can time out a call)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait(job: str, timeout: float = 600, logs: Path | None = None) -> dict:
    """Until the job has ended for good. A requeue passes through an ended state (the old run is killed) before
    PENDING, so an end other than COMPLETED must last a few seconds. A requeued job is released after 3 s pending
    (Slurm would hold it for ~2 minutes). A poll the controller does not answer counts as no news, not as a state;
    a timeout says what every job on the node was doing (and the tails of the *.out files in LOGS), the way to tell
    a slow node from a stuck job."""
    end, ended_for, pending_for, state, info = time.monotonic() + timeout, 0, 0, "never seen", {}
    while time.monotonic() < end:
        info = show(job)
        if not info:
            time.sleep(1)
            continue
        state = info.get("JobState", "")
        pending_for = pending_for + 1 if state == "PENDING" else 0
        if pending_for >= 3:  # released too soon, the node may still hold the old run ("credential revoked")
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        ended_for = (
            ended_for + 1
            if state
            in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
            else 0
        )
        if state == "COMPLETED" or ended_for >= 5:
            return info
        if info.get("Reason") == "DependencyNeverSatisfied":  # a job it waits on failed: it will never start
            break
        time.sleep(1)
    queue = subprocess.run(["squeue", "-o", "%i %T %r %M"], capture_output=True, text=True)
    tails = "".join(f"\n--- {p.name}:\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.out"))) if logs else ""
    raise AssertionError(f"job {job} still {state} (reason {info.get('Reason')}) after up to {timeout}s; "
                         f"squeue: {queue.stdout or queue.stderr}{tails}")  # fmt: skip


def history(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["event"], r["step"], r["restart_count"], r.get("exit_code")) for r in rows]


def test_two_task_training_job_completes_and_checkpoints(slurm, small_shards, tmp_path):
    """train_multinode.sbatch: two srun tasks, each an `accelerate launch` (like two nodes), meet by c10d."""
    run = tmp_path / "run"
    job = submit(
        "train_multinode.sbatch",
        tiny_overrides(small_shards, run, **{"train.steps": 12, "ckpt.every": 6}),
        tmp_path,
        ["--nodes=1", "--ntasks-per-node=2", "-c", "1"],
        {"SSLFW_PROCS_PER_NODE": "1"},
    )
    info = wait(job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "2 launcher(s) x 1 process(es)" in log
    assert [s for s, _ in ckpt.valid_checkpoints(run)] == [6, 12]
    assert history(run) == [("start", 0, 0, None), ("end", 12, 0, 0)]
    assert json.loads((run / "history.jsonl").read_text().splitlines()[0])["world_size"] == 2


@pytest.mark.parametrize("script,tasks", [("train.sbatch", 1), ("train_multinode.sbatch", 2)])
def test_signalled_job_saves_requeues_and_resumes_without_repeating_a_step(
    slurm, small_shards, tmp_path, script, tasks
):
    """1 task x 2 processes, and 2 tasks x 1 process (where srun ends the step as the first task exits)."""
    run, steps = tmp_path / "run", 200
    job = submit(
        script,
        tiny_overrides(small_shards, run, **{"train.steps": steps, "ckpt.every": 100, "eval.every": 0}),
        tmp_path,
        ["--nodes=1", f"--ntasks-per-node={tasks}", "-c", str(2 // tasks)],
        {"SSLFW_PROCS_PER_NODE": str(2 // tasks)},
    )
    metrics, end = run / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5) and time.monotonic() < end:
        time.sleep(0.2)
    subprocess.run(["scancel", "-b", "-s", "USR1", job], check=True)  # what --signal=B:USR1@300 delivers
    info = wait(job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "USR1: asking sslfw to save and stop" in log and "requeueing job" in log
    (_, _, _, _), (_, stopped, _, code), resumed, last = history(run)
    assert 5 <= stopped < steps and code == 75
    assert resumed == ("start", stopped, 1, None) and last == ("end", steps, 1, 0)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = [r["step"] for r in rows if "train/loss" in r]
    assert trained == list(range(1, steps + 1))  # every step logged once: none repeated, none skipped
    assert ckpt.valid_checkpoints(run)[-1][0] == steps and stopped in [s for s, _ in ckpt.valid_checkpoints(run)]


def test_a_job_whose_rank_dies_is_requeued_once_and_resumes(slurm, small_shards, tmp_path):
    """SIGKILL of rank 1 at step 13 of 20 (checkpoints every 5): the step fails without an sslfw exit code (or with
    its peer's 1); the script requeues the job once (SSLFW_CRASH_REQUEUES), it resumes from step 10 and finishes."""
    run = tmp_path / "run"
    job = submit(
        "train.sbatch",
        tiny_overrides(small_shards, run, **{"train.steps": 20, "ckpt.every": 5, "eval.every": 0}),
        tmp_path,
        ["-c", "2"],
        {"SSLFW_PROCS_PER_NODE": "2", "SSLFW_FAULT_KILL": "1:12", "SSLFW_FAULT_ONCE": str(tmp_path / "fired")},
    )
    info = wait(job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "a process died" in log and "(1 of SSLFW_CRASH_REQUEUES=1)" in log, log[-3000:]
    starts = [(e[0], e[1]) for e in history(run) if e[0] == "start"]
    assert starts == [("start", 0), ("start", 10)] and history(run)[-1][:2] == ("end", 20), history(run)


def test_pseudolabel_job_requeues_and_covers_the_pool_exactly_once(slurm, tiny_run, small_shards, tmp_path):
    out = tmp_path / "pseudo.csv"
    job = submit(
        "pseudolabel.sbatch",
        ["--checkpoint", str(tiny_run), "--out", str(out), "--chunk", "16", "--num-workers", "0", "--quiet"],
        tmp_path,
        ["-c", "2"],
        {"SSLFW_PROCS_PER_NODE": "2", "SSLFW_FAULT_SIGNAL": "0:0"},
    )
    info = wait(job)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "sslfw exit code 75" in log and '"chunks_reused": 1' in log  # rank 0 stopped after its chunk 0
    idx = [int(line.split(",")[1]) for line in out.read_text().splitlines()[1:]]
    assert idx == list(range(load_index(small_shards)["sets"]["unlabelled"]["count"]))


def test_a_grid_as_a_job_array_reports_what_the_serial_pipeline_reports(slurm, small_shards, tmp_path):
    """slurm/pipeline_grid.sh: one array task per row, then the report job after them all (afterok); its report has
    the rows, numbers included, of the same grid run serially in one job."""
    base = base_yaml(small_shards, tmp_path, **{"eval.every": 0, "log.wandb": "disabled"})
    grid = ["--config", str(tmp_path / "grid.yaml")]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "base": str(base), "algorithms": ["supervised", "fixmatch"], "seeds": [0], "retrain_stage": False,
        "ssl": {"train.steps": 4, "ckpt.every": 4, "data.num_workers": 0}}))  # fmt: skip
    env = {"SSLFW_PROCS_PER_NODE": "1"}
    serial = submit("pipeline.sbatch", [*grid, f"--out_dir={tmp_path / 'serial'}"], tmp_path, ["-c", "1"], env)
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "pipeline_grid.sh"), "--gres=gpu:0", "-c", "1", "-o", "grid-%A_%a.out", "--",
         *grid, f"--out_dir={tmp_path / 'array'}"],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "SSLFW_ROOT": str(ROOT), "SSLFW_VENV": sys.prefix, "SSLFW_CPU": "1", **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("rows: 2; array job "), proc.stdout
    report_job = proc.stdout.split("report job ")[1].split()[0]
    assert wait(serial, logs=tmp_path)["JobState"] == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    info = wait(report_job, logs=tmp_path)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("grid-*.out")))
    assert info["JobState"] == "COMPLETED", logs[-3000:]
    assert (tmp_path / "array" / "fixmatch-iqa_safe-s0" / "eval" / "eval.json").is_file()
    rows = {d: (tmp_path / d / "report.csv").read_text().splitlines() for d in ("serial", "array")}
    assert len(rows["array"]) == 1 + 4 and rows["array"] == rows["serial"]  # header, floor, ridge, 2 methods
