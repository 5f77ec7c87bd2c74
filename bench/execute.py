"""`bench run` after planning: load nothing until needed, run the stages, write results and provenance.

Streams: progress and logs go to stderr (bench/progress.py), the end-of-run summary - the result - to stdout
(bench/summary.py), so `bench run ... > out.txt` keeps the summary and a terminal shows both."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_bench.plan import Plan
from unlearn_bench.progress import ObservedStore, Progress, RunProgress
from unlearn_bench.run_state import RunState
from unlearn_bench.summary import render_summary


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}: no CUDA device is available (use --device cpu)")
    return device


def parse_gpus(text: str | None) -> list[int]:
    """`--gpus 0,1,3`, `0-3` or `all` -> device indices (checked against the visible devices)."""
    if not text:
        return []
    import torch

    n = torch.cuda.device_count()
    if text == "all":
        ids = list(range(n))
    else:
        ids = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            try:
                ids += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
            except ValueError as exc:
                raise SystemExit(f"error: --gpus {text!r}: expected e.g. 0,1 or 0-3 or all") from exc
    bad = [i for i in ids if i >= n or i < 0]
    if not ids or bad:
        raise SystemExit(f"error: --gpus {text!r}: {n} CUDA device(s) visible; bad: {bad or 'none selected'}")
    return ids


EXIT_FAILED_CELLS = 3  # `bench run` finished, but some cells failed (listed in run.json and the summary)


@dataclass
class Outcome:
    """What a run produced: rows of finished cells, failure records of the others, and the store's tallies."""

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"cached": 0, "computed": 0})
    touched: set[tuple[str, str]] = field(default_factory=set)


class _Collector:
    """Gathers task results as they finish and rewrites records.csv after each, rows in canonical task order,
    so an interrupted run leaves the cells it finished (and a re-run computes only the rest)."""

    def __init__(self, plan: Plan, out_dir: Path, progress: RunProgress) -> None:
        from unlearn_bench.runner import Runner

        self.order = {t: i for i, t in enumerate(Runner.task_list(plan))}
        self.done: dict[tuple[int, int, int], list[dict]] = {}
        self.failed: dict[tuple[int, int, int], dict] = {}
        self.outcome = Outcome()
        self.out_dir = out_dir
        self.progress = progress

    def __call__(self, result: tuple) -> None:
        from unlearn_bench.results import write_records

        task, rows, failure, counts, touched = result
        task = tuple(task)
        for k, v in counts.items():
            self.outcome.counts[k] = self.outcome.counts.get(k, 0) + v
        self.outcome.touched.update(tuple(t) for t in touched)
        self.progress.task_finished(task, counts, failure is not None)
        if failure is not None:
            self.failed[task] = failure
            self.progress.warn(f"FAILED {failure['method']} x {failure['attack']} seed {failure['seed']}: "
                               f"{failure['stage']} ({failure['what']}): {failure['reason']}")
            return
        self.done[task] = rows
        self.outcome.rows = [r for t in sorted(self.done, key=self.order.__getitem__) for r in self.done[t]]
        write_records(self.out_dir / "records.csv", self.outcome.rows)

    def finish(self) -> Outcome:
        """The outcome with failures in canonical task order (workers report them in completion order)."""
        self.outcome.failures = [self.failed[t] for t in sorted(self.failed, key=self.order.__getitem__)]
        return self.outcome


def task_label(plan: Plan, task: tuple[int, int, int]) -> str:
    seed, mi, ai = task
    return f"{plan.methods[mi].name} x {plan.attacks[ai].name} seed {seed}"


def estimate_stages(plan: Plan) -> dict[tuple[int, int, int], int]:
    """Store lookups each task will make, from the plan alone (no model): the method's data sets and unlearn
    stage (when it changes weights), the attack's data set and stage (when it has one), and per evaluated state
    (each checkpoint step) one generate per prompt scope plus one score per metric of that scope. Shared stages count
    in every task that looks them up (the later lookups are cache hits, as run.json counts them). A metric's own
    cached stage (a reference set's features) is not foreseen: the live count raises the total when it appears.
    A component that cannot even be built here counts as one stage; its task will fail and report its own count."""
    from unlearn_bench.attacks.base import Attack, PromptAttack
    from unlearn_bench.components import build_component
    from unlearn_bench.methods_runtime import build_method, changes_weights

    per_state = sum(1 + sum(1 for m in plan.metrics if m.params.get("scope", "target") == scope)
                    for scope in plan.prompts)
    method_n: list[int] = []
    for spec in plan.methods:
        try:
            method_n.append(1 + len(build_method(spec, plan.concept).data_requests()) if changes_weights(spec) else 0)
        except Exception:  # noqa: BLE001 - the task reports the real problem
            method_n.append(1)
    attack_n: list[int] = []
    for spec in plan.attacks:
        try:
            attack = build_component(spec, Attack, plan.concept)
            if isinstance(attack, PromptAttack):
                attack_n.append(1 + per_state)
            else:
                steps = attack.steps()
                own = 0 if steps == [0] else 1 + (attack.data_request() is not None)
                attack_n.append(own + len(steps) * per_state)
        except Exception:  # noqa: BLE001
            attack_n.append(1)
    from unlearn_bench.runner import Runner

    return {t: method_n[t[1]] + attack_n[t[2]] for t in Runner.task_list(plan)}


def execute(plan: Plan, out_dir: Path, store_dir: Path, device: str = "auto", batch_size: int = 16,
            quiet: bool = False, workers: int = 1, gpus: str | None = None, executor: str = "local",
            slurm: dict | None = None, threads: int = 0, progress_interval: float = 30.0) -> Outcome:
    """Run the plan; every cell either lands in records.csv or in run.json's failure list (never both).

    Prints progress on stderr (none with quiet) and, at the end, the summary on stdout (also with quiet: it is
    the result): bench/summary.py."""
    import uuid

    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from unlearn_bench.results import code_version, provenance, write_leaderboard, write_records, write_run_json
    from unlearn_bench.runner import Runner

    started = time.time()
    device = resolve_device(device)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    cv = code_version()
    run_id = uuid.uuid4().hex[:12]  # failure markers of this run are shared by its workers, retried by the next
    store = ObservedStore(store_dir, code_version=f"{cv['commit'][:12]}{'+dirty' if cv['dirty'] else ''}",
                          run_id=run_id)
    gpu_ids = parse_gpus(gpus)
    write_records(out_dir / "records.csv", [])  # never leave a previous run's rows beside this run's run.json
    info = provenance(device, cv) | {"plan": plan.resolved(), "prompts_seeds_hash": plan.prompts_seeds_hash(),
                                 "store": str(store_dir.resolve()), "run_id": run_id, "status": "running"}
    write_run_json(out_dir, info)
    tasks = Runner.task_list(plan)
    estimate = estimate_stages(plan)
    state = RunState(estimate, {t: task_label(plan, t) for t in tasks})
    with RunProgress(state, quiet=quiet, interval=progress_interval) as progress:
        collect = _Collector(plan, out_dir, progress)
        if executor in ("slurm", "submitit-local"):
            from unlearn_bench.parallel import run_submitit

            run_submitit(plan, store_dir, store.code_version, batch_size, out_dir / "submitit",
                         "local" if executor == "submitit-local" else "slurm", slurm or {}, collect, run_id)
        elif gpu_ids or workers > 1:
            from unlearn_bench.parallel import run_workers, worker_threads

            devices = [f"cuda:{i}" for i in gpu_ids] if gpu_ids else ["cpu"] * workers
            # everything cached: answer in this process, without starting workers (seconds of imports each)
            per_worker = threads or worker_threads(devices)
            if not _all_cached(plan, store, device if not gpu_ids else devices[0], batch_size, per_worker or None,
                               collect):
                progress.log(f"running {len(devices)} workers: {', '.join(devices)}")
                run_workers(plan, store_dir, store.code_version, devices, batch_size, collect, run_id, per_worker,
                            on_event=progress.handle, cost=estimate)
        else:
            store.observer = progress.observer(0)
            runner = Runner(plan, store, device=device, batch_size=batch_size, progress=progress.runner_progress)
            for task in runner.tasks():
                progress.task_started(task)
                result = runner.task_result(task)
                progress.handle(("end", 0, task))
                collect(result)
    outcome = collect.finish()
    write_records(out_dir / "records.csv", outcome.rows)
    if outcome.rows:
        write_leaderboard(out_dir)
    keys: dict[str, list[str]] = {}
    for stage, key in sorted(outcome.touched):
        keys.setdefault(stage, []).append(key)
    compute = compute_seconds(store, outcome.touched, run_id)
    info |= {"stages": dict(outcome.counts), "seconds": round(time.time() - started, 2),
             "compute_seconds": compute, "status": "failed cells" if outcome.failures else "complete",
             "failures": outcome.failures, "store_keys": keys}
    write_run_json(out_dir, info)
    if not quiet:
        spent = ", ".join(f"{k} {v:.0f}s" for k, v in compute.items())
        print(f"stages: {outcome.counts['cached']} cached, {outcome.counts['computed']} computed "
              f"({info['seconds']:.1f}s){f'; computing took {spent}' if spent else ''}", file=sys.stderr, flush=True)
    if outcome.failures:
        print_failures(outcome.failures, out_dir)
    judge = (plan.concept.metrics or (None,))[0]
    from unlearn_bench.robustness_data import read_summary

    print(render_summary(outcome.rows, out_dir, judge, len(outcome.failures), len(tasks),
                         robustness=read_summary(out_dir)), flush=True)
    return outcome


def compute_seconds(store: Any, touched: set[tuple[str, str]], run_id: str) -> dict[str, float]:
    """Seconds spent computing each stage kind in this run (summed over workers, so on N workers the total is
    up to N x the wall time), from the manifests this run wrote (they carry its run id): where a run's time goes,
    in run.json, without a profiler. A stage computed inside another (a metric's reference features, inside a
    score) counts in both. Largest first."""
    import json

    totals: dict[str, float] = {}
    for stage, key in touched:
        try:
            manifest = json.loads((store.path(stage, key) / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("run_id") == run_id:
            totals[stage] = totals.get(stage, 0.0) + float(manifest.get("seconds", 0.0))
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _all_cached(plan: Plan, store: Any, device: str, batch_size: int, threads: int | None,
                collect: _Collector) -> bool:
    """Feed collect every task's rows if every stage is already in the store (read in this process, with the
    workers' numeric environment so the keys are theirs), else False and nothing collected."""
    from dataclasses import replace

    from unlearn_bench.runner import Runner
    from unlearn_bench.store import NotCached

    probe = replace(store, cached_only=True, counts={"cached": 0, "computed": 0}, touched=set(), observer=None)
    runner = Runner(plan, probe, device=device, batch_size=batch_size, progress=Progress(quiet=True),
                    threads=threads)
    results = []
    try:
        for task in runner.tasks():
            result = runner.task_result(task)
            if result[2] is not None:
                return False  # a failed cell is retried by the workers
            results.append(result)
    except NotCached:
        return False
    for r in results:
        collect(r)
    return True


def print_failures(failures: list[dict], out_dir: Path) -> None:
    """The end-of-run list of failed cells (stderr), each with its reason; exit status 3 follows."""
    lines = [f"{len(failures)} cell(s) FAILED (no rows written for them; run.json 'failures'; "
             f"re-running the same command retries only these):"]
    lines += [f"  - {f['method']} x {f['attack']} seed {f['seed']}: {f['stage']} ({f['what']}): {f['reason']}"
              for f in failures]
    print("\n".join(lines), file=sys.stderr)
