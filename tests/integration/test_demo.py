"""``crossdistill demo``: budgets, the honest verdict, and (slow) the whole tiny demo end to end."""

from __future__ import annotations

import json

import pytest

from crossdistill.demo import BUDGETS, NAMES, budget_for, verdict
from crossdistill.errors import ConfigError


def test_budgets():
    assert budget_for("tiny") is BUDGETS["tiny"]
    custom = budget_for("40")
    assert custom.bridge_steps == custom.distill_steps == 40
    assert custom.eval_prompts == BUDGETS["default"].eval_prompts
    for bad in ("fast", "0"):
        with pytest.raises(ConfigError):
            budget_for(bad)


def _results(teacher: float, shared: float, cross: float, fd_shared: float, fd_cross: float) -> dict:
    def summary(acc: float, fd: float, std: float = 0.01) -> dict:
        return {
            "summary": {
                "acc/joint": {"mean": acc, "std": std, "n": 3},
                "fd/judge_features": {"mean": fd, "std": std, "n": 3},
                "latency_ms": {"mean": 1.0, "std": 0.0, "n": 3},
            }
        }

    return {
        NAMES["teacher"]: summary(teacher, 1.0),
        NAMES["shared_one"]: summary(shared, fd_shared),
        NAMES["cross_one"]: summary(cross, fd_cross),
    }


def test_verdict_reports_wins_and_the_gap_closed():
    lines = verdict(_results(teacher=0.9, shared=0.5, cross=0.8, fd_shared=5.0, fd_cross=3.0), NAMES)
    assert lines[0].startswith("Cross-space is ahead of shared-space on 2 of 2 quality metrics.")
    assert "closes 75% of the gap" in lines[0]
    assert any("fd/judge_features" in line and "ahead (beyond" in line for line in lines)


def test_verdict_says_when_cross_space_is_behind():
    lines = verdict(_results(teacher=0.9, shared=0.6, cross=0.595, fd_shared=3.0, fd_cross=5.0), NAMES)
    assert lines[0].startswith("Cross-space is ahead of shared-space on 0 of 2 quality metrics.")
    assert any("acc/joint" in line and "behind (within" in line for line in lines)  # a 0.005 dip is noise
    tie = verdict(_results(teacher=0.9, shared=0.6, cross=0.6, fd_shared=3.0, fd_cross=3.0), NAMES)
    assert tie[0].startswith("Cross-space is ahead of shared-space on 0 of 2") and "tie at 0.600" in tie[1]
    assert "closes -2% of the gap" in lines[0]


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    from crossdistill.cli import main
    from crossdistill.toy.world import FILES, WEIGHTS_DIR

    if not all((WEIGHTS_DIR / f).is_file() for f in FILES.values()):
        pytest.skip("the emoji world's weights are not built into this checkout")
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PLAN" in printed and f"report: {out / 'report.html'}" in printed
    for name in ("report.md", "report.html", "demo.json", "report_files/bars.png", "report_files/grid.png"):
        assert (out / name).is_file(), name
    for key in NAMES:
        assert (out / "eval" / key / "metrics.json").is_file()
    summary = json.loads((out / "demo.json").read_text())
    assert summary["verdict"][0].startswith("Cross-space is ahead of shared-space on")
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "crossdistill distill --preset emoji_shared" in report
    assert "report_files/grid.png" in report
