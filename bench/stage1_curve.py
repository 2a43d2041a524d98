"""Stage-1 learning curve: train the points of a curve config one at a time, resumably, then tabulate and plot.

    .venv/bin/python bench/stage1_curve.py                           # bench/stage1_curve.yaml
    .venv/bin/python bench/stage1_curve.py --report                  # curve.md + curve.png from what exists
    .venv/bin/python bench/stage1_curve.py --only v46_3k --only v17_3k   # these points, in this order
    .venv/bin/python bench/stage1_curve.py --config my_curve.yaml --wait 0   # do not wait for missing features
    .venv/bin/python bench/stage1_curve.py --test c_small_34k          # the point chosen on dev, on test: once

Each point is one ``tune run speechmapper_pretrain --config <base_config> output_dir=<output_dir>/<name>
data.train_manifest=... data.val_manifest=<dev_manifest> max_steps=... resume=True <common> <overrides>``,
run under ``nice -n 19`` (``--nice``). Stopping the runner (or the machine) at any time and running it again resumes:
finished points are skipped, the running one continues from its last checkpoint (the recipe's exact resume),
and its CPU and wall seconds add up over the runs (``<output_dir>/state.json``, written atomically; polled each
minute, so a runner killed with its machine loses at most a minute of them).
With ``results_dir`` set, every report also writes each started point's figures (state, validations, machine)
to ``<results_dir>/<name>.json``: committed, they outlive the machine, so a point done there is not run
again on a new one and the table and plot still show it (its checkpoints and features stay behind).

A point's training data is ``data.<name>.manifest`` or, with ``sentences: N``, its first N utterances
(``cuts_first<N>.jsonl.gz`` beside it, so the features' ``extract_info.json`` still applies); while that
manifest is still being extracted, the first N are cut from its finished shards once they hold N.
``start_step: N`` (a point warm-started with ``init_projector`` from another's step N) draws its curve from step N on.
``epochs: E`` means E x the subset's batches per epoch (epoch 0's packing, at the point's
``max_tokens_per_batch``; items the recipe would skip still count); ``steps_of: other`` the other point's steps.
A point whose data is not there yet is passed over for the next ready one; with none ready the runner
sleeps ``--wait`` seconds and looks again (``--wait 0``: stop). A point that fails is marked failed with its
log's last lines and skipped on later runs (``--retry-failed`` runs it again).

With ``end_wer`` set (``config`` and ``overrides`` of a ``speechmapper_generate`` run), a point that finishes here
has its best checkpoint (``best_checkpoint.metric`` in ``common``; else its last) decoded on the dev manifest
and scored for WER (as ``speechmapper_eval`` scores ASR), once; the figure joins its state. ``--test POINT`` scores a point chosen on dev on ``test_manifest``, once (a second
call is refused): the recipe's own validation of that checkpoint (``init_projector=... max_steps=0
validate_at_start=True``) and the same decoding; kept in its state as ``test``.

The report reads each point's ``metrics.jsonl``: dev nearest-token accuracy at every validation (overall and
by how often each dev token occurs in the point's training targets: 0-9, 10-49, 50-499, 500+), the dev
classifier CE, the end point's dev zero-shot WER, steps, epochs, CPU-hours and wall hours; ``curve.md`` holds
the table, ``curve.png`` the curves (dev accuracy against steps, one line per point, a panel per group, the
``reference`` point in each) and the last accuracy by bucket.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(Path(__file__).with_suffix(".yaml"))  # the plan: not a recipe config, so beside its runner
BUCKETS = ("seen_0_9", "seen_10_49", "seen_50_499", "seen_500_plus")
ACCOUNT_EVERY_S = 60.0  # how often a running point's CPU and wall seconds are written to the state
POINT_KEYS = {"name", "data", "sentences", "steps", "epochs", "steps_of", "overrides", "group", "start_step"}


# ---------------------------------------------------------------- config and state
def load_curve(path: str) -> dict:
    from omegaconf import OmegaConf

    from speechmapper_tune.configs import resolve_config

    file = Path(path) if Path(path).suffix == ".yaml" else Path(resolve_config(path))
    cfg = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    for key in ("base_config", "output_dir", "dev_manifest", "data", "points"):
        if key not in cfg:
            raise ValueError(f"{file}: setting {key} is missing")
    names = set()
    for i, p in enumerate(cfg["points"]):
        where = f"{file}: points[{i}] ({p.get('name', '?')})"
        unknown = set(p) - POINT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(POINT_KEYS)}")
        if not p.get("name") or p["name"] in names:
            raise ValueError(f"{where}: each point needs a unique name")
        if p.get("data") not in cfg["data"]:
            raise ValueError(f"{where}: data={p.get('data')!r} is not one of data: {sorted(cfg['data'])}")
        if sum(k in p for k in ("steps", "epochs", "steps_of")) != 1:
            raise ValueError(f"{where}: set exactly one of steps, epochs, steps_of")
        if not isinstance(p.get("start_step", 0), int) or p.get("start_step", 0) < 0:
            raise ValueError(f"{where}: start_step={p['start_step']!r} must be a step count (0 or more)")
        if "steps_of" in p and p["steps_of"] not in names:
            raise ValueError(f"{where}: steps_of={p['steps_of']!r} must name an earlier point")
        names.add(p["name"])
    if cfg.get("reference") is not None and cfg["reference"] not in names:
        raise ValueError(f"{file}: reference={cfg['reference']!r} names no point")
    if cfg.get("end_wer") is not None and not (isinstance(cfg["end_wer"], dict) and cfg["end_wer"].get("config")):
        raise ValueError(f"{file}: end_wer needs config (a speechmapper_generate config) and optional overrides")
    cfg["output_dir"] = str(_abs(cfg["output_dir"]))
    if cfg.get("results_dir"):
        cfg["results_dir"] = str(_abs(cfg["results_dir"]))
    return cfg


def _abs(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


class State:
    """``state.json``: per point its status, steps, CPU and wall seconds; every write atomic."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "state.json"
        self.data: Dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def point(self, name: str) -> dict:
        return self.data.setdefault(name, {"status": "pending", "cpu_s": 0.0, "wall_s": 0.0})

    def save(self) -> None:
        """Written over what is on disk, key by key: another process (``--test`` beside a running runner) may have
        added figures since this one read the file, and keys are only ever added or updated."""
        from speechmapper_tune.checkpoint.atomic import atomic_write_json

        disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        for name, st in self.data.items():
            merged = {**disk.get(name, {}), **st}
            st.clear()
            st.update(merged)  # the same dict: callers hold it
        for name, st in disk.items():
            self.data.setdefault(name, st)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)


def machine() -> str:
    """The CPU a point ran on (CPU-hours compare only on the same kind), and whether it has native bf16."""
    import platform

    from speechmapper_tune.dtypes import native_bf16

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    bf16 = "native bf16" if native_bf16("cpu") else "no native bf16"
    return f"{os.cpu_count()}-core {model}, {bf16}"


class Results:
    """``<results_dir>/<name>.json`` per point: what a new machine keeps of a point run elsewhere."""

    def __init__(self, results_dir: Optional[str]):
        self.dir = Path(results_dir) if results_dir else None

    def get(self, name: str) -> dict:
        path = self.dir / f"{name}.json" if self.dir else None
        return json.loads(path.read_text()) if path and path.is_file() else {}

    def done(self, name: str) -> bool:
        return self.get(name).get("state", {}).get("status") == "done"

    def save(self, name: str, state: dict, metrics: List[dict]) -> None:
        from speechmapper_tune.checkpoint.atomic import atomic_write_json

        kept = [m for m in metrics if "val_token_acc" in m]  # validations, and the last training row's epoch
        kept += [m for m in metrics if "epoch" in m][-1:]
        previous = self.get(name)
        record = {"state": state, "metrics": kept, "machine": previous.get("machine") or machine()}
        if (previous.get("state"), previous.get("metrics")) == (state, kept):
            return  # unchanged: no rewrite of a committed file
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / f"{name}.json", record)


# ---------------------------------------------------------------- data
def _read_cuts(path: Path) -> List[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def subset_manifest(manifest: Path, n: Optional[int]) -> Optional[Path]:
    """The first ``n`` utterances of ``manifest`` as a manifest beside it (None while not enough are extracted)."""
    if n is None:
        return manifest if manifest.is_file() else None
    out = manifest.parent / f"cuts_first{n}.jsonl.gz"
    if out.is_file():
        return out
    if manifest.is_file():
        lines = _read_cuts(manifest)
    else:  # still being extracted: its finished shards, in order, from the first
        lines, k = [], 0
        while len(lines) < n and (manifest.parent / "shards" / f"cuts-{k:05d}.jsonl.gz").is_file():
            lines += _read_cuts(manifest.parent / "shards" / f"cuts-{k:05d}.jsonl.gz")
            k += 1
        if len(lines) < n:
            return None
    if len(lines) < n:
        raise ValueError(f"{manifest} holds {len(lines)} utterances, fewer than sentences={n}")
    from speechmapper_tune.checkpoint.atomic import atomic_path

    with atomic_path(out) as tmp:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.writelines(lines[:n])
    return out


def batches_per_epoch(manifest: Path, base_cfg, overrides: List[str]) -> int:
    """Epoch 0's batch count of the pretrain recipe's sampler on ``manifest`` (the point's model and batch cap)."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from speechmapper_tune.data.sampler import LengthCappedBatchSampler

    cfg = OmegaConf.merge(base_cfg, OmegaConf.from_dotlist([o for o in overrides if not o.startswith("~")]))
    model = tt_config.instantiate(cfg.model)
    max_tokens = int(cfg.data.max_tokens_per_batch)
    lengths = [int(model.output_length(int(json.loads(l)["features"]["num_frames"]))) for l in _read_cuts(manifest)]
    lengths = [n for n in lengths if 1 <= n <= max_tokens]
    return len(LengthCappedBatchSampler(lengths, max_tokens, shuffle=True, seed=int(cfg.seed)))


# ---------------------------------------------------------------- running
def run_point(cfg: dict, point: dict, state: State, steps: int, manifest: Path, nice: int = 19) -> bool:
    out = Path(cfg["output_dir"]) / point["name"]
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        "nice",
        "-n",
        str(nice),
        str(REPO / ".venv" / "bin" / "tune"),
        "run",
        "speechmapper_pretrain",
        "--config",
        cfg["base_config"],
        f"output_dir={out}",
        f"data.train_manifest={manifest}",
        f"data.val_manifest={_abs(cfg['dev_manifest'])}",
        f"max_steps={steps}",
        "resume=True",
        *cfg.get("common", []),
        *point.get("overrides", []),
    ]
    st = state.point(point["name"])
    fold_unaccounted(st)
    st.update(status="running", steps=steps, manifest=str(manifest), command=" ".join(cmd[3:]))
    state.save()
    print(f"[curve] {point['name']}: {steps} steps on {manifest}", flush=True)
    t0 = time.time()
    with open(out / "train.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            saved = t0
            while True:  # polled, so a runner killed with its machine leaves its seconds in the state
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.time() - saved >= ACCOUNT_EVERY_S and (cpu := process_cpu_s(proc.pid)) is not None:
                    saved = time.time()
                    st.update(running_cpu_s=cpu, running_wall_s=saved - t0)
                    state.save()
                time.sleep(1.0)
        except KeyboardInterrupt:
            proc.terminate()
            _, status, usage = os.wait4(proc.pid, 0)
            _account(state, st, usage, t0, "stopped")
            raise
    rc = os.waitstatus_to_exitcode(status)
    _account(state, st, usage, t0, "done" if rc == 0 else "failed")
    if rc != 0:
        tail = (out / "train.log").read_text(errors="replace").splitlines()[-5:]
        st["error"] = f"exit {rc}: " + " | ".join(tail)
        state.save()
        print(f"[curve] {point['name']} FAILED (exit {rc}); log {out / 'train.log'}", flush=True)
    return rc == 0


def _decode_wer(cfg: dict, out: Path, checkpoint: Path, manifest: Path, name: str, nice: int) -> Optional[dict]:
    """``checkpoint`` decoded on ``manifest`` as ``end_wer`` says, scored as ``speechmapper_eval`` scores ASR."""
    from speechmapper_tune.metrics import asr_scores, with_and_without

    spec, gen = cfg["end_wer"], out / f"{name}_generation"
    cmd = ["nice", "-n", str(nice), str(REPO / ".venv" / "bin" / "tune"), "run", "speechmapper_generate"]
    cmd += ["--config", spec["config"], f"projector_checkpoint={checkpoint}", f"manifest={manifest}"]
    cmd += [f"output_dir={gen}", *spec.get("overrides", [])]
    with open(out / f"{name}_generation.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        print(f"[curve] generation failed (exit {rc}); log {out / f'{name}_generation.log'}", flush=True)
        return None
    rows = [json.loads(line) for line in (gen / "generations.jsonl").read_text().splitlines() if line.strip()]
    wer = with_and_without([r for r in rows if r.get("reference")], lambda r, h: asr_scores(r, h)["wer"])
    return {"wer": wer["all"], "wer_without_stuck": wer["without"], "n": wer["num_items"], "stuck": wer["num_flagged"]}


def _checkpoint_to_read(out: Path) -> Optional[Path]:
    """A finished point's checkpoint to read: its best dev validation's (``best_checkpoint.metric``), else its last."""
    from speechmapper_tune.checkpoint.projector_io import CheckpointManager

    manager = CheckpointManager(out)
    return (manager.best() or manager.latest()) if out.is_dir() else None


def score_point(cfg: dict, point: dict, state: State, nice: int = 19) -> None:
    """Dev zero-shot WER of a point finished here: its checkpoint (best, else last) decoded as ``end_wer`` says (the demo's
    decoding and the paper's zero-shot prompt), scored as ``speechmapper_eval`` scores ASR; kept in its state."""
    st, out = state.point(point["name"]), Path(cfg["output_dir"]) / point["name"]
    latest = _checkpoint_to_read(out)
    if not cfg.get("end_wer") or st.get("status") != "done" or "dev_wer" in st or latest is None:
        return
    print(f"[curve] {point['name']}: dev zero-shot WER of {latest.name}", flush=True)
    wer = _decode_wer(cfg, out, latest, _abs(cfg["dev_manifest"]), "dev", nice)
    if wer:
        st.update(dev_wer=wer["wer"], dev_wer_without_stuck=wer["wer_without_stuck"], dev_wer_n=wer["n"])
        st.update(dev_wer_stuck=wer["stuck"], dev_wer_step=int(latest.name.rsplit("_", 1)[-1]))
        state.save()


def score_test(cfg: dict, name: str, nice: int = 0) -> dict:
    """The test split, once, for the report of a point chosen on dev: its checkpoint's nearest-token accuracy
    (the recipe's own validation, ``max_steps=0``) and zero-shot WER; refused when the point has test figures."""
    state = State(Path(cfg["output_dir"]))
    st, out = state.point(name), Path(cfg["output_dir"]) / name
    if "test" in st or "test" in Results(cfg.get("results_dir")).get(name).get("state", {}):
        raise SystemExit(f"{name}: the test split was scored already ({st.get('test')}); it is scored once")
    latest = _checkpoint_to_read(out)
    if st.get("status") != "done" or latest is None or not cfg.get("end_wer"):
        raise SystemExit(f"{name}: --test needs a point finished on this machine (its checkpoint) and end_wer")
    if not cfg.get("test_manifest") or not _abs(cfg["test_manifest"]).is_file():
        raise SystemExit(f"--test: test_manifest {cfg.get('test_manifest')!r} is not there (extract the test split)")
    point = next(p for p in cfg["points"] if p["name"] == name)
    read = out / "test_validation"
    cmd = ["nice", "-n", str(nice), str(REPO / ".venv" / "bin" / "tune"), "run", "speechmapper_pretrain"]
    cmd += ["--config", cfg["base_config"], f"output_dir={read}", f"init_projector={latest}", "max_steps=0"]
    cmd += ["validate_at_start=True", f"data.train_manifest={st['manifest']}"]
    cmd += [f"data.val_manifest={_abs(cfg['test_manifest'])}", *cfg.get("common", []), *point.get("overrides", [])]
    print(f"[curve] {name}: test split, once: nearest-token accuracy and zero-shot WER of {latest.name}", flush=True)
    with open(out / "test_validation.log", "a") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode != 0:
            raise SystemExit(f"{name}: the test validation failed; log {out / 'test_validation.log'}")
    val = [m for m in _metrics(read) if "val_token_acc" in m][-1]
    wer = _decode_wer(cfg, out, latest, _abs(cfg["test_manifest"]), "test", nice)
    if wer is None:
        raise SystemExit(f"{name}: the test generation failed")
    st["test"] = {
        "step": int(latest.name.rsplit("_", 1)[-1]),
        "token_acc": val["val_token_acc"],
        "classifier_ce": val.get("val_classifier_ce"),
        **{f"token_acc_{b}": val.get(f"val_token_acc_{b}") for b in BUCKETS},
        **wer,
    }
    state.save()
    return st["test"]


def process_cpu_s(pid: int) -> Optional[float]:
    """CPU seconds of a running process and its waited-for children (``/proc/<pid>/stat``); None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def fold_unaccounted(st: dict) -> None:
    """A run killed with its runner (no exit to account) left its last polled seconds: count them once."""
    st["cpu_s"] = st.get("cpu_s", 0.0) + st.get("running_cpu_s", 0.0)
    st["wall_s"] = st.get("wall_s", 0.0) + st.get("running_wall_s", 0.0)
    st.update(running_cpu_s=0.0, running_wall_s=0.0)  # zeroed, not deleted: State.save keeps keys from disk


def _account(state: State, st: dict, usage, t0: float, status: str) -> None:
    st["cpu_s"] = st.get("cpu_s", 0.0) + usage.ru_utime + usage.ru_stime
    st["wall_s"] = st.get("wall_s", 0.0) + time.time() - t0
    st.update(status=status, running_cpu_s=0.0, running_wall_s=0.0)
    state.save()


def plan_steps(cfg: dict, point: dict, state: State, manifest: Path, base_cfg) -> Optional[int]:
    st = state.point(point["name"])
    if st.get("steps"):
        return int(st["steps"])  # fixed at the first start: a resume keeps the schedule's length
    if "steps" in point:
        return int(point["steps"])
    if "steps_of" in point:
        of = point["steps_of"]
        other = state.data.get(of, {}).get("steps") or Results(cfg.get("results_dir")).get(of).get("state", {}).get(
            "steps"
        )
        return int(other) if other else None  # known once the other point has started
    per_epoch = batches_per_epoch(manifest, base_cfg, list(cfg.get("common", [])) + list(point.get("overrides", [])))
    st["batches_per_epoch"] = per_epoch
    return int(point["epochs"]) * per_epoch


def run_all(cfg: dict, only: List[str], wait: float, retry_failed: bool, nice: int = 19) -> None:
    from omegaconf import OmegaConf

    from speechmapper_tune.configs import resolve_config

    base_cfg = OmegaConf.load(resolve_config(cfg["base_config"]))
    state = State(Path(cfg["output_dir"]))
    results = Results(cfg.get("results_dir"))
    by_name = {p["name"]: p for p in cfg["points"]}
    points = [by_name[name] for name in only] if only else cfg["points"]  # --only: in the order given
    for point in points:  # finished before end_wer was set, or stopped while scoring
        score_point(cfg, point, state, nice)
    while True:
        todo = [
            p
            for p in points
            if state.point(p["name"])["status"] not in ("done",)
            and not results.done(p["name"])  # done on another machine
            and (retry_failed or state.point(p["name"])["status"] != "failed")
        ]
        if not todo:
            break
        started = False
        for point in todo:
            data = cfg["data"][point["data"]]
            manifest = subset_manifest(_abs(data["manifest"]), point.get("sentences"))
            if manifest is None or not _abs(cfg["dev_manifest"]).is_file():
                continue
            steps = plan_steps(cfg, point, state, manifest, base_cfg)
            if steps is None:
                continue
            if run_point(cfg, point, state, steps, manifest, nice):
                score_point(cfg, point, state, nice)
            report(cfg)
            started = True
            break  # re-read from the top: an earlier point may have become ready
        if not started:
            if wait <= 0:
                print(f"[curve] waiting for data of: {', '.join(p['name'] for p in todo)}; stopping (--wait 0)")
                break
            print(
                f"[curve] {time.strftime('%H:%M:%S')} no point ready ({len(todo)} waiting for features); "
                f"next look in {wait:.0f} s",
                flush=True,
            )
            time.sleep(wait)
    report(cfg)


# ---------------------------------------------------------------- report
def _metrics(out: Path) -> List[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a stop
    return rows


def summarize(cfg: dict) -> List[dict]:
    state = State(Path(cfg["output_dir"]))
    results = Results(cfg.get("results_dir"))
    rows = []
    for p in cfg["points"]:
        st = state.data.get(p["name"], {})
        metrics = _metrics(Path(cfg["output_dir"]) / p["name"])
        if st.get("status", "pending") != "pending" and results.dir:
            results.save(p["name"], st, metrics)
        elif results.dir and (kept := results.get(p["name"])):  # run on another machine: its committed figures
            st, metrics = kept["state"], kept["metrics"]
        val = [m for m in metrics if "val_token_acc" in m]
        train = [m for m in metrics if "epoch" in m]
        best = max(val, key=lambda m: m["val_token_acc"]) if val else None
        last = val[-1] if val else None
        data = cfg["data"][p["data"]]
        rows.append(
            {
                "name": p["name"],
                "group": p.get("group", ""),
                "status": st.get("status", "pending"),
                "sentences": p.get("sentences") or "all",
                "voices": data.get("voices", "?"),
                "overrides": " ".join(p.get("overrides", [])),
                "steps": st.get("steps"),
                "step": last["step"] if last else 0,
                "epoch": train[-1]["epoch"] if train else None,
                "batches_per_epoch": st.get("batches_per_epoch"),
                "acc": last["val_token_acc"] if last else None,
                "best_acc": best["val_token_acc"] if best else None,
                "best_step": best["step"] if best else None,
                "ce": last.get("val_classifier_ce") if last else None,
                "wer": st.get("dev_wer"),
                "wer_stuck": st.get("dev_wer_stuck"),
                "buckets": {b: last.get(f"val_token_acc_{b}") for b in BUCKETS} if last else {},
                "shares": {b: last.get(f"val_token_share_{b}") for b in BUCKETS} if last else {},
                "curve": [(p.get("start_step", 0) + m["step"], m["val_token_acc"]) for m in val],
                "cpu_h": st.get("cpu_s", 0.0) / 3600,
                "wall_h": st.get("wall_s", 0.0) / 3600,
            }
        )
    return rows


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(rows: List[dict]) -> str:
    lines = [
        "| point | group | sentences | voices | changes | steps done / planned | epochs | dev token acc % (last) | "
        "best (step) | last by train count 0-9 / 10-49 / 50-499 / 500+ % | dev classifier CE | "
        "dev zero-shot WER % (stuck) | CPU-h | wall h | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        buckets = " / ".join(_pct(r["buckets"].get(b)) for b in BUCKETS) if r["buckets"] else "-"
        best = f"{_pct(r['best_acc'])} ({r['best_step']})" if r["best_acc"] is not None else "-"
        ce = f"{r['ce']:.2f}" if r["ce"] is not None else "-"
        epochs = f"{r['epoch'] + 1}" if r["epoch"] is not None else "-"
        wer = f"{r['wer']:.1f} ({r['wer_stuck']})" if r["wer"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['group']} | {r['sentences']} | {r['voices']} | {r['overrides'] or '-'} | "
            f"{r['step']} / {r['steps'] or '?'} | {epochs} | {_pct(r['acc'])} | {best} | {buckets} | {ce} | {wer} | "
            f"{r['cpu_h']:.2f} | {r['wall_h']:.2f} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path, reference: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group"] for r in rows if r["curve"]})
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(5 * (len(groups) + 1), 4), squeeze=False)
    ref = next((r for r in rows if r["name"] == reference and r["curve"]), None)
    for ax, group in zip(axes[0], groups):
        if ref is not None and ref["group"] != group:  # the point the others change one thing of, in every panel
            steps, acc = zip(*ref["curve"])
            ax.plot(steps, [100 * a for a in acc], color="grey", ls="--", label=f"{ref['name']} (reference)")
        for r in [r for r in rows if r["group"] == group and r["curve"]]:
            steps, acc = zip(*r["curve"])
            ax.plot(steps, [100 * a for a in acc], marker=".", label=r["name"])
        ax.set(title=f"{group}: dev token accuracy", xlabel="step", ylabel="%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    done = [r for r in rows if r["buckets"]]
    width = 0.8 / max(len(done), 1)
    for i, r in enumerate(done):
        vals = [100 * (r["buckets"].get(b) or 0.0) for b in BUCKETS]
        ax.bar([k + i * width for k in range(len(BUCKETS))], vals, width, label=r["name"])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(BUCKETS))], ["0-9", "10-49", "50-499", "500+"])
    ax.set(title="last dev accuracy by training count", xlabel="times the token occurs in training targets", ylabel="%")
    ax.legend(fontsize=6)
    fig.tight_layout()
    from speechmapper_tune.checkpoint.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def report(cfg: dict) -> None:
    from speechmapper_tune.checkpoint.atomic import atomic_write_text

    rows = summarize(cfg)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    atomic_write_text(
        out / "curve.md", f"Stage-1 learning curve ({cfg['base_config']}; dev = held-out voices)\n\n" + table
    )
    if any(r["curve"] for r in rows):
        plot(rows, out / "curve.png", cfg.get("reference"))
    print(table, flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="curve config: a packaged name or a .yaml path")
    ap.add_argument("--only", action="append", default=[], help="run only these points, in this order (repeatable)")
    ap.add_argument("--report", action="store_true", help="only write curve.md and curve.png")
    ap.add_argument("--test", metavar="POINT", help="score POINT on the test split, once (after choosing it on dev)")
    ap.add_argument("--wait", type=float, default=600, help="seconds between looks when no point's data is ready")
    ap.add_argument("--retry-failed", action="store_true")
    ap.add_argument("--nice", type=int, default=19, help="niceness of the training runs (default 19: background)")
    a = ap.parse_args(argv)
    # kill/TERM stops like Ctrl-C: the running point is stopped and its CPU and wall seconds are kept
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cfg = load_curve(a.config)
    unknown = set(a.only) - {p["name"] for p in cfg["points"]}
    if unknown:
        sys.exit(f"--only names unknown points {sorted(unknown)}")
    if a.test:
        if a.test not in {p["name"] for p in cfg["points"]}:
            sys.exit(f"--test names an unknown point {a.test!r}")
        print(json.dumps(score_test(cfg, a.test, a.nice), indent=1))
        report(cfg)
    elif a.report:
        report(cfg)
    else:
        run_all(cfg, a.only, a.wait, a.retry_failed, a.nice)


if __name__ == "__main__":
    main()
