"""CPU threads from the cores other processes leave free (scripts/threads.py, config id ``num_threads``).

Busy cores are real background processes (pure-Python busy loops, killed in a ``finally``).
CI machines may be noisy: the assertions are relations that other load cannot break (other
load only makes cores busier), never exact idle values.
"""

import json
import logging
import os
import re
import resource
import subprocess
import sys
import time

import pytest
import torch
from helpers import BUNDLE, lumir_folder, run_workflow, tiny_checkpoint
from monai.bundle import ConfigParser

from scripts.errors import InputError
from scripts import threads
from scripts.threads import CpuThreads, check_num_threads, choose_threads, own_cpu_seconds

CORES = len(os.sched_getaffinity(0))
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]
# a sibling process (not a child of the busy loops' parent, whose children count as its own):
# it prints the threads it would choose for each line it reads
CHOOSER = "import sys\nfrom scripts.threads import choose_threads\nprint('ready', flush=True)\n" \
          "for _ in sys.stdin:\n    print(choose_threads()[0], flush=True)\n"


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _ask(chooser) -> int:
    chooser.stdin.write("go\n")
    chooser.stdin.flush()
    return int(chooser.stdout.readline())


def test_idle_choice_is_between_one_and_the_cores():
    n, why = choose_threads("auto")
    assert 1 <= n <= min(CORES, threads.DEFAULT_THREADS)
    assert why.startswith("auto; other processes busy on")


def test_busy_processes_leave_fewer_threads_and_all_cores_busy_leave_one():
    chooser = subprocess.Popen([sys.executable, "-c", CHOOSER], cwd=BUNDLE, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    busy = []
    try:
        assert chooser.stdout.readline().strip() == "ready"  # torch imported before the load starts
        busy.append(subprocess.Popen(BUSY_LOOP))
        time.sleep(0.3)
        one_busy = _ask(chooser)
        busy += [subprocess.Popen(BUSY_LOOP) for _ in range(CORES - 1)]
        time.sleep(0.3)
        all_busy = _ask(chooser)
    finally:
        for p in busy + [chooser]:
            p.kill()
        for p in busy + [chooser]:
            p.wait()
    assert all_busy == 1
    assert 1 <= one_busy <= max(1, CORES - 1)


def test_own_child_processes_count_as_own_not_other_load():
    """Data-loader workers are this process's own: busy_cores subtracts its children's CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = subprocess.Popen(BUSY_LOOP)
    try:
        own0 = own_cpu_seconds()
        time.sleep(0.5)
        own1 = own_cpu_seconds()
    finally:
        child.kill()
        child.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # its whole life
    assert child_cpu > 0.05
    assert own1 - own0 >= 0.8 * child_cpu - 0.03  # the window covers nearly all of its life


@pytest.mark.parametrize("bad", [0, -1, "two", True, 1.5, None])
def test_num_threads_takes_auto_or_a_positive_int(bad):
    assert check_num_threads("auto") == "auto" and check_num_threads(3) == 3
    with pytest.raises(InputError, match="num_threads"):
        check_num_threads(bad)


def test_forced_count_is_set_logged_and_restored_when_the_engine_completes(keep_threads, caplog):
    from ignite.engine import Engine

    before = torch.get_num_threads()
    seen = []
    engine = Engine(lambda e, b: seen.append(torch.get_num_threads()))
    CpuThreads(num_threads=1).attach(engine)
    with caplog.at_level(logging.INFO, logger="eoir.threads"):
        engine.run([0, 1, 2], max_epochs=1)
    assert seen == [1, 1, 1]
    assert [r.getMessage() for r in caplog.records if r.name == "eoir.threads"] == ["CPU threads: 1 (num_threads=1)"]
    assert torch.get_num_threads() == before


def test_auto_logs_the_first_choice_and_then_only_changes(keep_threads, caplog, monkeypatch):
    choices = iter([(2, "a"), (2, "b"), (1, "c"), (1, "d")])
    monkeypatch.setattr(threads, "choose_threads", lambda num_threads: next(choices))
    handler = CpuThreads("auto", recheck_seconds=0.0)
    with caplog.at_level(logging.INFO, logger="eoir.threads"):
        assert [handler.choose() for _ in range(4)] == [2, 2, 1, 1]
    assert [r.getMessage() for r in caplog.records if r.name == "eoir.threads"] == \
        ["CPU threads: 2 (a)", "CPU threads: 1 (c)"]


def test_cuda_device_leaves_the_threads_and_says_so(keep_threads, caplog):
    from ignite.engine import Engine

    torch.set_num_threads(2)
    seen = []
    engine = Engine(lambda e, b: seen.append(torch.get_num_threads()))
    CpuThreads(num_threads=1, device="cuda").attach(engine)  # constructing a device does not need a GPU
    with caplog.at_level(logging.INFO, logger="eoir.threads"):
        engine.run([0], max_epochs=1)
    assert seen == [2]
    assert [r.getMessage() for r in caplog.records if r.name == "eoir.threads"] == ["CPU threads: left at 2 (device cuda)"]


def test_inference_config_logs_the_choice_and_honours_num_threads(tmp_path, keep_threads, capsys):
    data_json = lumir_folder(tmp_path / "data", ids=(1, 2))
    ckpt = tiny_checkpoint(tmp_path / "m8.pt")
    kw = dict(ckpt_path=str(ckpt), output_dir=str(tmp_path / "out"), dataset_dir=str(tmp_path / "data"),
              data_list_file_path=str(data_json), io_iterations=0, device="cpu", preprocess="off",  # small stand-in images
              **{"network_def#start_channel": 8})
    run_workflow("inference.json", num_threads=1, **kw)
    run_workflow("inference.json", **kw)  # the default: auto
    # the bundle's logging.conf logs to stdout
    lines = re.findall(r"eoir\.threads - INFO - (.*)", capsys.readouterr().out)
    assert lines[0] == "CPU threads: 1 (num_threads=1)"
    assert len(lines) == 2 and lines[1].startswith("CPU threads: ") and "(auto; other processes busy on" in lines[1]


def test_train_and_evaluate_configs_choose_the_threads_of_their_engine():
    for files, handlers in ((["train.json"], "train#handlers"), (["train.json", "evaluate.json"], "validate#handlers")):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        assert parser["num_threads"] == "auto"
        index = [isinstance(h, dict) and h.get("_target_") for h in parser[handlers]].index("scripts.threads.CpuThreads")
        parser["device"] = "cpu"
        parser["num_threads"] = 3
        handler = parser.get_parsed_content(f"{handlers}#{index}")
        assert isinstance(handler, CpuThreads) and handler.num_threads == 3 and handler.on_cpu


def test_shared_cpu_tool_times_runs_under_busy_processes_and_stops_them():
    """``python -m scripts.tools.shared_cpu`` (tiny training step): a row per load, the threads
    of each step, and no busy process left behind."""
    tool = subprocess.Popen([sys.executable, "-m", "scripts.tools.shared_cpu", "--cases", "train_step", "--busy", "0,1",
                             "--num_threads", "auto", "--train_shape", "32,48,32", "--train_start_channel", "4"],
                            cwd=BUNDLE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = tool.communicate(timeout=300)
    finally:
        tool.kill()
    assert tool.returncode == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert [(r["busy"], r["num_threads"]) for r in report["runs"]] == [(0, "auto"), (1, "auto")]
    for r in report["runs"]:
        assert r["seconds"] > 0 and r["x_idle"] > 0 and r["external_busy"] >= 0
        assert len(r["threads"]) == 2 and all(1 <= t <= CORES for t in r["threads"])  # warm-up and timed step
    left = subprocess.run(["pgrep", "-f", f"busy loop of {tool.pid}"], capture_output=True, text=True).stdout.split()
    assert not left
