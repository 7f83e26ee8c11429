"""Bad input through the real CLI: one clear error line (exit 2, no traceback), and nothing lost.

Each case is a row of the reliability table in docs/reliability.md. Faults during training (kill -9, NaN, full
disk) are covered beside the machinery they test: tests/integration/test_kill_resume.py,
tests/integration/test_distill_resume.py, tests/unit/test_checkpoint.py, tests/unit/test_train_machinery.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossdistill.cli import main
from crossdistill.models.sd3 import SD3Space
from crossdistill.models.sd15 import SD15Space

TINY_DISTILL = [
    "--set", "model.student_family=sd15", "--set", "model.student_path=tiny:0",
    "--set", "model.teacher_family=sd15", "--set", "model.teacher_path=tiny:0",
    "--set", "model.bridge_kind=identity", "--set", "train.batch_size=2", "--set", "train.max_steps=2",
    "--set", "train.critic_steps_per_generator_step=1", "--set", "checkpoint.every=1", "--set", "log.sample_every=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny model folders, a corrupt copy, prompt files and a Bridge for sd15 tiny ← sd3 tiny."""
    root = tmp_path_factory.mktemp("reliability")
    out = {"root": root}
    SD15Space.tiny(seed=0).save_pretrained(root / "sd15")
    SD3Space.tiny(seed=0).save_pretrained(root / "sd3")
    SD15Space.tiny(seed=0).save_pretrained(root / "corrupt")
    weights = next((root / "corrupt" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a download cut short
    (root / "prompts.txt").write_text("a red cat\na blue dog\n")
    (root / "empty.txt").write_text("\n\n")
    (root / "malformed.jsonl").write_text('{"text": "a cat"}\n{not json\n')
    assert main(["bridge", "train", "--preset", "tiny", "--run-dir", str(root / "bridge_run")]) == 0
    out.update({k: root / k for k in ("sd15", "sd3", "corrupt", "prompts.txt", "empty.txt", "malformed.jsonl")})
    out["bridge"] = root / "bridge_run" / "bridge"
    return out


def _distill(folders, run: str, *extra: str) -> list[str]:
    prompts = ["--set", f"data.prompts={folders['prompts.txt']}"]
    return ["distill", "--run-dir", str(folders["root"] / run), *TINY_DISTILL, *prompts, *extra]


CASES = {
    # name: (argv builder, words the one error line must contain)
    "missing model folder": (
        lambda f: _distill(f, "r_missing", "--set", "model.student_path=/nonexistent/sd15"),
        ["/nonexistent/sd15", "does not exist"],
    ),
    "family that does not match the folder": (
        lambda f: _distill(f, "r_family", "--set", f"model.student_path={f['sd3']}"),
        ["sd3"],
    ),
    "corrupt model weights": (
        lambda f: _distill(f, "r_corrupt", "--set", f"model.student_path={f['corrupt']}"),
        ["safetensors"],
    ),
    "Bridge built for other spaces": (
        lambda f: _distill(
            f, "r_bridge", "--set", "model.teacher_family=sd3", "--set", "model.teacher_path=tiny:1",
            "--set", "model.bridge_kind=prior_projector", "--set", f"model.bridge_path={f['bridge']}",
            "--set", "model.student_path=" + str(f["sd15"]), "--set", "model.teacher_family=sdxl",
            "--set", "model.teacher_path=tiny:0",
        ),  # fmt: skip
        ["Bridge", "Teacher"],
    ),
    "empty prompt set": (
        lambda f: _distill(f, "r_empty", "--set", f"data.prompts={f['empty.txt']}"),
        ["no prompts", "empty.txt"],
    ),
    "malformed prompt set": (
        lambda f: _distill(f, "r_malformed", "--set", f"data.prompts={f['malformed.jsonl']}"),
        ["malformed.jsonl"],
    ),
    "resolution that does not fit the VAE factor": (
        lambda f: ["bridge", "train", "--preset", "tiny", "--run-dir", str(f["root"] / "r_res"),
                   "--set", "model.student_resolution=17"],  # fmt: skip
        ["17", "not a multiple"],
    ),
    "unknown --set key": (
        lambda f: _distill(f, "r_key", "--set", "train.learning_rate=1e-4"),
        ["unknown key", "train.learning_rate"],
    ),
    "value of the wrong type": (
        lambda f: _distill(f, "r_type", "--set", "train.max_steps=many"),
        ["train.max_steps", "int"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, folders, capsys):
    build, words = CASES[case]
    rc = main(build(folders))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    last = err[-1]
    assert last.startswith("crossdistill "), err
    assert "Traceback" not in "\n".join(err)
    for word in words:
        assert word in last, (word, last)


def test_run_dir_of_another_run_is_refused_and_kept(folders, capsys):
    run = folders["root"] / "r_taken"
    assert main(_distill(folders, "r_taken")) == 0
    before = (run / "config.json").read_text()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    rc = main(_distill(folders, "r_taken", "--set", "train.seed=7"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "already holds another run" in err and "train.seed" in err
    assert (run / "config.json").read_text() == before  # nothing overwritten
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert json.loads(before)["train"]["seed"] == 0
