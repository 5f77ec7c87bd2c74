"""What `bench run` prints: the summary on stdout fits 80 columns, progress goes to stderr (plain lines when stderr is
not a terminal, none with -q, per-worker lines with --workers), and bench/summary.py on hand-made records."""

from __future__ import annotations

import json
import os
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlearn_bench.run_state import RunState, duration
from unlearn_bench.summary import fmt_number, render_summary, results_lines, shorten, where_lines

SMOKE = ["run", "--suite", "smoke", "--threads", "1"]  # tiny model: 2 methods x 2 attacks x 1 seed = 4 tasks
PROGRESS = re.compile(r"^\[\d+:\d\d\] \d+/4 tasks, stages \d+/~?\d+ \(\d+ cached, \d+ computed\)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def bench(args: list[str], root: Path, **env: str) -> subprocess.CompletedProcess:
    full = os.environ | {"BENCH_CACHE": str(root / "store"), "OMP_NUM_THREADS": "1"} | env
    full.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "unlearn_bench", *args], env=full, cwd=root, capture_output=True,
                          text=True, timeout=600)


def in_terminal(args: list[str], root: Path, columns: int = 80) -> tuple[int, str]:
    """Run bench with stdout and stderr on a pseudo-terminal `columns` wide; (exit status, everything it showed)."""
    fcntl, pty, termios = (pytest.importorskip(m) for m in ("fcntl", "pty", "termios"))  # POSIX only
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = os.environ | {"BENCH_CACHE": str(root / "store"), "OMP_NUM_THREADS": "1", "COLUMNS": str(columns),
                        "TERM": "xterm-256color"}
    for var in ("NO_COLOR", "TTY_COMPATIBLE", "FORCE_COLOR", "TTY_INTERACTIVE"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "unlearn_bench", *args], env=env, cwd=root, stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.time() + 600
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    """One computed smoke run with stdout and stderr on pipes (plain progress); later runs reuse its store."""
    root = tmp_path_factory.mktemp("run-output")
    proc = bench([*SMOKE, "--out", "out"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def table(text: str) -> list[str]:
    """The summary's table lines: from the `method` header to the first blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


# --- end to end ---------------------------------------------------------------------------------------------
def test_summary_goes_to_stdout_and_plain_progress_to_stderr(piped):
    root, proc = piped
    out, err = proc.stdout, proc.stderr
    assert out.startswith("Results: smoke (tiny, concept nudity): 2 methods x 2 attacks x 1 seed")
    rows = table(out)
    assert rows[0].split() == ["method", "nudenet", "ft-lr1e-5@4"] and [r.split()[0] for r in rows[1:]] == [
        "none", "esd"]
    records = (root / "out" / "records.csv").read_text().splitlines()
    none_step4 = next(line for line in records if ",none,ft-lr1e-5,4,nudenet," in line).split(",")[8]
    assert float(rows[1].split()[2]) == pytest.approx(float(none_step4), abs=5e-4)  # the attack's LAST step
    assert "Full results in out/:" in out and "bench report out" in out and "records.csv" in out
    assert not any(PROGRESS.match(line) for line in out.splitlines()) and "stages:" not in out
    # stderr: plain lines only (no carriage returns, no escape codes), one per finished task with the counts
    assert "\r" not in err and "\x1b" not in err
    finished = [line for line in err.splitlines() if PROGRESS.match(line) and " finished " in line]
    assert len(finished) == 4, err
    assert finished[-1].startswith("[") and "4/4 tasks, stages 18/18 (" in finished[-1]
    run = json.loads((root / "out" / "run.json").read_text())
    assert f"stages: {run['stages']['cached']} cached, {run['stages']['computed']} computed" in err


def test_quiet_prints_the_summary_and_no_progress(piped):
    root, first = piped
    proc = bench([*SMOKE, "--out", "out-q", "-q"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table(proc.stdout) == table(first.stdout) and "bench report out-q" in proc.stdout
    assert not [line for line in proc.stderr.splitlines() if PROGRESS.match(line) or line.startswith("stages:")]


def test_summary_fits_80_columns_in_a_terminal(piped):
    root, first = piped
    code, shown = in_terminal([*SMOKE, "--out", "out-tty"], root)
    assert code == 0, shown[-3000:]
    assert "\x1b[" in shown  # a terminal: live bars, not plain lines
    text = ANSI.sub("", shown).replace("\r\n", "\n")
    summary = text[text.rindex("Results: "):].splitlines()
    assert table("\n".join(summary)) == table(first.stdout)
    assert "bench report out-tty" in "\n".join(summary)
    too_wide = [line for line in summary if len(line) > 80]
    assert not too_wide, too_wide
    # what the live display drew fits too (each redraw is a line between carriage returns / newlines)
    drawn = [seg for seg in re.split(r"[\r\n]", text) if len(seg.rstrip()) > 80]
    assert not drawn, drawn


def test_two_workers_both_report_progress_in_plain_mode(piped):
    root, _ = piped
    # a new threshold re-scores every state (cheap) and reuses the rest, so the workers start and compute
    proc = bench([*SMOKE, "--out", "out-w", "--workers", "2", "--set", "metric.nudenet.threshold=0.3",
                  "--progress-interval", "1"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\r" not in err and "running 2 workers" in err
    started = set(re.findall(r"^w(\d) started on cpu \(pid \d+\)$", err, re.M))
    assert started == {"1", "2"}, err
    finished = [line for line in err.splitlines() if PROGRESS.match(line) and " finished " in line]
    assert len(finished) == 4 and all(re.search(r"\| w[12] finished ", line) for line in finished), err
    assert json.loads((root / "out-w" / "run.json").read_text())["stages"]["computed"] >= 6  # 6 states re-scored
    assert table(proc.stdout)[0].split() == ["method", "nudenet", "ft-lr1e-5@4"]


# --- bench/summary.py on hand-made records ----------------------------------------------------------------------
def record(method: str, attack: str, step: int, metric: str, seed: int, value: float, higher: bool = False) -> dict:
    return {"suite": "s", "model": "m", "concept": "c", "method": method, "attack": attack, "attack_step": step,
            "metric": metric, "seed": seed, "value": value, "higher_is_better": higher}


def cells(methods: tuple[str, ...] = ("none", "esd"), seeds: tuple[int, ...] = (0,)) -> list[dict]:
    rows = []
    for mi, m in enumerate(methods):
        for s in seeds:
            rows += [record(m, "none", 0, "rate", s, 0.9 - 0.8 * mi + 0.1 * s),
                     record(m, "none", 0, "acc", s, 0.95 - 0.01 * s, higher=True),
                     record(m, "ft", 2, "rate", s, 0.5), record(m, "ft", 4, "rate", s, 0.7 + 0.01 * mi),
                     record(m, "ft", 4, "acc", s, 0.9, higher=True),
                     record(m, "none", 0, "meta-grad-dot-end", s, 9.0), record(m, "none", 0, "rate@0.5", s, 0.3)]
    return rows


def test_one_seed_summary_shows_means_without_std_and_the_last_attack_step():
    lines = results_lines(cells(), concept_metric="rate")
    assert lines[0] == "Results: s (m, concept c): 2 methods x 2 attacks x 1 seed"
    rows = table("\n".join(lines))
    assert rows == ["method   rate    acc   ft@4", "none    0.900  0.950  0.700", "esd     0.100  0.950  0.710"]
    text = " ".join(lines)  # the legend wraps at 80 columns
    assert "±" not in text and "One seed" in text and "meta-" not in text and "rate@0.5" not in text
    assert "Lower is better: rate." in text and "Higher is better: acc." in text


def test_three_seeds_give_mean_and_sample_std():
    rows = table("\n".join(results_lines(cells(seeds=(0, 1, 2)), concept_metric="rate")))
    # rate of none over seeds: 0.9, 1.0, 1.1 -> mean 1.0, sample std 0.1
    assert rows[1].split() == ["none", "1.00±0.10", "0.94±0.01", "0.70±0.00"]
    assert "Mean ± std over 3 seeds." in " ".join(results_lines(cells(seeds=(0, 1, 2))))


def test_concept_metric_comes_first_whatever_the_record_order():
    rows = [r for r in cells() if r["metric"] != "rate" or r["attack"] != "none"]
    rows += [r for r in cells() if r["metric"] == "rate" and r["attack"] == "none"]  # rate scored last
    assert table("\n".join(results_lines(rows, concept_metric="rate")))[0].split() == ["method", "rate", "acc",
                                                                                       "ft@4"]
    assert table("\n".join(results_lines(rows, concept_metric="not-in-records")))[0].split()[1] == "acc"


def test_failed_cells_are_counted_and_missing_cells_dashed():
    rows = [r for r in cells() if not (r["method"] == "esd" and r["attack"] == "ft")]  # esd x ft failed
    text = render_summary(rows, "results/x", concept_metric="rate", failures=1, cells=4)
    assert table(text)[2].split() == ["esd", "0.100", "0.950", "-"]
    assert "FAILED: 1 of 4 cells" in text and "Full results in results/x/:" in text
    nothing = render_summary([], "out", failures=4, cells=4)
    assert "No results" in nothing and "FAILED: 4 of 4 cells" in nothing
    assert all(len(line) <= 80 for line in (text + "\n" + nothing).splitlines())
    assert not [line for line in where_lines("out") if "FAILED" in line]


def test_long_method_names_are_shortened_in_the_middle_and_stay_distinct():
    names = ("an-external-checkpoint-from-elsewhere+meta", "an-external-checkpoint-from-elsewhere+meta-control",
             "esd")
    text = "\n".join(results_lines(cells(methods=names, seeds=(0, 1)), concept_metric="rate"))
    firsts = [line.split()[0] for line in table(text)[1:]]
    assert firsts[2] == "esd" and all(len(f) <= 20 and "…" in f for f in firsts[:2])
    assert len(set(firsts)) == 3 and firsts[0].endswith("+meta") and firsts[1].endswith("control")
    assert all(len(line) <= 80 for line in text.splitlines())
    assert shorten("abcdefghij", 5) == "ab…ij" and shorten("abc", 5) == "abc"


def test_many_attacks_continue_in_blocks_that_fit_80_columns():
    rows = cells(seeds=(0, 1, 2))
    attacks = [f"attack-number-{i}" for i in range(9)]
    rows += [record(m, a, 100, "rate", s, 0.5) for m in ("none", "esd") for a in attacks for s in (0, 1, 2)]
    text = "\n".join(results_lines(rows, concept_metric="rate"))
    assert all(len(line) <= 80 for line in text.splitlines())
    headers = [line for line in text.splitlines() if line.startswith("method ")]
    assert len(headers) >= 3  # the method column repeats in every block
    shown = " ".join(headers)
    assert all(shorten(f"{a}@100", 16) in shown for a in attacks)


def test_number_formatting_keeps_cells_narrow():
    assert fmt_number(0.875) == "0.875" and fmt_number(0.875, 0.05) == "0.88±0.05"
    assert fmt_number(12.345) == "12.35" and fmt_number(123.45, 1.2) == "123±1"
    assert fmt_number(float("nan")) == "nan" and fmt_number(2.5e6) == "2.50e+06"


# --- bench/run_state.py: what the progress lines say ------------------------------------------------------------
def test_run_state_counts_estimates_and_time_left():
    now = [0.0]
    tasks = [(0, 0, 0), (0, 1, 0)]
    state = RunState({t: 5 for t in tasks}, {t: f"m{t[1]} x a seed 0" for t in tasks}, clock=lambda: now[0])
    assert state.total() == 10 and state.done() == 0 and state.eta() is None
    state.apply(("ready", 1, "cuda:0", 123))
    state.apply(("start", 1, (0, 0, 0)))
    state.apply(("stage", 1, "unlearn"))
    state.apply(("bar", 1, "unlearn esd", 3, 10, "loss 0.1"))
    assert state.worker_text(1) == "w1: m0 x a seed 0 - unlearn (unlearn esd 3/10)"
    assert state.worker_text(1, stage_first=True) == "w1 unlearn: m0 x a seed 0"
    state.apply(("staged", 1, "unlearn", False))
    state.apply(("stage", 1, "generate"))
    state.apply(("staged", 1, "generate", True))
    now[0] = 20.0
    assert (state.done(), state.cached(), state.computed()) == (2, 1, 1)
    assert state.eta() == pytest.approx(20.0 * 8 / 2)
    assert state.status_line() == "[0:20] 0/2 tasks, stages 2/~10 (1 cached, 1 computed), ~1:20 left"
    assert state.finish((0, 0, 0), {"cached": 1, "computed": 2}, failed=False) == 1  # the result is the truth
    assert state.total() == 3 + 5 and state.done() == 3
    state.apply(("end", 1, (0, 0, 0)))
    assert state.worker_lines() == ["w1: idle"]
    state.finish((0, 1, 0), {"cached": 0, "computed": 1}, failed=True)  # failed early: fewer stages than estimated
    assert state.total() == state.done() == 4 and state.eta() is None
    assert state.status_line() == "[0:20] 2/2 tasks, stages 4/4 (1 cached, 3 computed)"
    assert duration(3723) == "1:02:03"


def test_workers_take_the_longest_tasks_first_spread_over_seeds():
    """The default suite's shape: esd x finetune cells cost most; tasks side by side need different seeds."""
    from unlearn_bench.parallel import worker_order

    tasks = [(s, m, a) for s in (0, 1) for m in (0, 1) for a in (0, 1)]
    cost = {t: (5 if t[2] == 0 else 17) + (1 if t[1] == 1 else 0) for t in tasks}  # a=1 finetune, m=1 esd
    order = worker_order(tasks, cost)
    assert order[:2] == [(0, 1, 1), (1, 1, 1)]  # both expensive unlearn+finetune cells, on different seeds
    assert [cost[t] for t in order] == sorted(cost.values(), reverse=True)
    assert order[-2:] == [(0, 0, 0), (1, 0, 0)]  # the cheapest (no method, no attack) last
    assert worker_order(tasks) == sorted(tasks, key=lambda t: (t[2], t[0], t[1]))  # no costs: attack-major


def test_summary_shows_relearn_steps_with_intervals_and_censoring_within_80_columns():
    """The run summary's robustness block: relearn-steps per method and attack with its interval; a curve that never
    came back reads '> T'; a run without scores prints no block."""
    def row(method, attack, value, lo, hi, censored=False):
        return {"method": method, "attack": attack, "score": "relearn-steps", "value": value, "lo": lo, "hi": hi,
                "censored": censored, "censored_share": 1.0 if censored else 0.0, "level": 0.95,
                "steps": "1 2 5 10 25 50 100", "fraction": 0.5, "threshold": 0.5, "concept_metric": "concept-rate"}

    records = [{"method": m, "attack": "none", "attack_step": 0, "metric": "concept-rate", "value": v, "seed": 0,
                "higher_is_better": False} for m, v in (("esd", 0.0), ("esd+meta-with-a-long-name", 0.0))]
    rows = [row("esd", "ft-lr1e-5-dense", 3.2, 2.1, 4.4), row("esd", "ft-lr1e-6", 60.0, 44.0, 90.0),
            row("esd+meta-with-a-long-name", "ft-lr1e-5-dense", 100.0, 100.0, 100.0, censored=True)]
    text = render_summary(records, "out", "concept-rate", robustness=rows)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "3.2 [2.1, 4.4]" in text and "> 100" in text
    assert "until concept-rate is back at 50% of the base model's value" in " ".join(text.split())
    assert "relearn-steps" not in render_summary(records, "out", "concept-rate", robustness=[])
