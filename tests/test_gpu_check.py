"""benchmarks/gpu_check.py, run CPU against CPU on a tiny problem, so that it cannot rot between the
rare sessions that have a GPU: every check runs, passes, and lands in the table and report.json."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


TINY = ["--device", "cpu", "--width", "0.25", "--n-train", "16", "--n-test", "8", "--gram-samples", "8",
        "--rsvd-rank", "4", "--matrix-free-batch", "8", "--data-root", "/nonexistent"]


def test_every_check_passes_cpu_against_cpu(gpu_check, tmp_path, capsys):
    # no data root: the check falls back to the bundled digits (and asks for no more test images
    # than digits has)
    assert gpu_check.main(TINY + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["check"]: row for row in report["rows"]}
    for check in ("build J", "gram (structured)", "lstsq", "ridge", "cg", "rsvd", "sgd", "matrix-free J·v",
                  "matrix-free cg", "tf32 off: matmul", "tf32 flags"):
        assert rows[check]["status"] == "ok", rows[check]
        assert check in out  # and it is in the printed table
    assert rows["build on cuda:1"]["status"] == "skip"  # no second GPU on the CPU
    assert report["environment"]["device"] == "cpu"
    assert "digits" in out


def test_a_mismatch_fails_the_run(gpu_check, tmp_path, monkeypatch, capsys):
    # a tolerance no real comparison can meet (errors are ≥ 0): the run must exit 1 and say which
    monkeypatch.setattr(gpu_check, "GRAM_RTOL", -1.0)
    assert gpu_check.main(TINY + ["--out", str(tmp_path), "--checks", "gram"]) == 1
    assert "FAILED: gram (structured)" in capsys.readouterr().err


def test_a_check_that_raises_is_a_failure_and_the_others_still_run(gpu_check, tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("simulated broken GPU path")

    monkeypatch.setitem(gpu_check.CHECKS, "gram", broken)
    assert gpu_check.main(TINY + ["--out", str(tmp_path), "--checks", "gram,tf32"]) == 1
    rows = {row["check"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert rows["gram"]["status"] == "FAIL" and "simulated broken GPU path" in rows["gram"]["note"]
    assert rows["tf32 flags"]["status"] == "ok"
    capsys.readouterr()


def test_bad_arguments_are_refused_with_the_known_names(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--checks", "gram,nonsense", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "matrix-free-cg" in err
    assert gpu_check.main(["--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "auto, cpu, cuda or cuda:N" in capsys.readouterr().err
