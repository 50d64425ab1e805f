"""The generalisation study: its statistics on hand-computed numbers, early stopping on validation only, and --quick end to end."""

from __future__ import annotations

import json
import math

import pytest

from fsam_dist.study.harness import (DEFAULT_TASKS, TASKS, Plan, baseline_scores, main, make_plan, markdown, run_config,
                                     score_run)
from fsam_dist.study.stats import paired, summary


def test_summary_on_hand_computed_numbers():
    s = summary([1, 2, 3, 4, 5])
    assert s["n"] == 5 and s["mean"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(math.sqrt(2.5))                  # Σ(x-3)² = 10, / (n-1)
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)                    # t(0.975, 4) from the tables
    assert s["half_width"] == pytest.approx(half, rel=1e-5)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((3 - half, 3 + half), rel=1e-5)
    one = summary([7.0])
    assert one["mean"] == 7.0 and math.isnan(one["std"]) and math.isnan(one["half_width"])


def test_paired_difference_on_hand_computed_numbers():
    d = paired([2, 4, 6], [1, 2, 3])                                   # differences 1, 2, 3
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    assert d["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)   # t(0.975, 2)
    assert d["p_value"] == pytest.approx(0.07418, abs=5e-5)           # t = 2√3 on 2 degrees of freedom
    with pytest.raises(ValueError, match="same number"):
        paired([1, 2], [1, 2, 3])


def test_rho_override_reaches_every_perturbing_row(tmp_path):
    def rho(plan_rho, method):
        plan = Plan(model="m", out=tmp_path, tasks=[TASKS["g2p"]], methods=[method], seeds=[0], sizes={"g2p": (8,)},
                    steps={("g2p", 8): 4}, eval_every={("g2p", 8): 2}, lr=1e-3, batch_size=4, mask_interval=2,
                    workers=1, rho=plan_rho)
        return run_config(plan, TASKS["g2p"], 8, method, 0, tmp_path / "eval.jsonl", tmp_path / "run")["fsam"].get("rho")

    assert [rho(None, m) for m in ("adamw", "sam", "fsam", "afsam")] == [None, 0.05, 0.05, 0.5]
    assert [rho(0.2, m) for m in ("adamw", "sam", "fsam", "fsam-k4", "afsam")] == [None, 0.2, 0.2, 0.2, 2.0]


def _predictions(run_dir, step, rows):
    folder = run_dir / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"step-{step}.jsonl").write_text("".join(json.dumps({"target": t, "prediction": p}) + "\n"
                                                       for t, p in rows))


def test_early_stopping_looks_at_validation_only(tmp_path):
    # 2 validation rows then 2 test rows. Step 10: validation perfect, test wrong; step 20: the reverse.
    right, wrong = ("AA B", "AA B"), ("AA B", "K L")    # PER 0 and 100
    _predictions(tmp_path, 10, [right, right, wrong, wrong])
    _predictions(tmp_path, 20, [wrong, wrong, right, right])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "step_time": 0.5}) + "\n")
    scores = score_run(tmp_path, TASKS["g2p"], n_val=2)
    assert scores["best_step"] == 10 and scores["val"] == 0.0 and scores["test"] == 100.0
    assert scores["final_test"] == 0.0 and scores["step_time"] == 0.5


def test_no_model_baselines_are_scored_per_part(tmp_path):
    # 2 validation rows then 1 test row of the stress task; the copy baseline of spelling on the same file.
    rows = [("p r o f a n a t i o n", "2 0 1 0"), ("f u n n y", "1 0"), ("g l o r e", "1")]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    scores = baseline_scores(TASKS["stress"], eval_file, n_val=2)
    assert scores["vowel-groups"] == {"val": 50.0, "test": 100.0}      # "1 0 0 0" wrong, "1 0" and "1" right
    assert set(scores) == {"majority", "vowel-groups"}
    spelling = baseline_scores(TASKS["spelling"], eval_file, n_val=2)
    assert spelling == {"copy": {"val": 0.0, "test": 0.0}}
    assert "spelling" not in DEFAULT_TASKS and "text" not in TASKS     # tried and dropped: they do not learn here


def test_seed_list_and_sizes_make_the_plan(tmp_path):
    from argparse import Namespace

    args = Namespace(tasks=["stress"], sizes=[300], steps=None, evals=5, model="m", out=tmp_path, methods=["adamw"],
                     seeds=5, seed_list=[4, 3, 4], lr=1e-3, batch_size=16, mask_interval=50, workers=1, rho=None)
    plan = make_plan(args)
    assert plan.seeds == [4, 3] and plan.steps == {("stress", 300): 500} and plan.eval_every == {("stress", 300): 100}
    args.seed_list = None
    assert make_plan(args).seeds == [0, 1, 2, 3, 4]
    args.sizes = [9500]
    with pytest.raises(SystemExit, match="at most 9000"):
        make_plan(args)


def test_quick_study_end_to_end(tmp_path, tiny_t5_dir):
    out = tmp_path / "study"
    code = main(["--quick", "--model", tiny_t5_dir, "--out", str(out), "--steps", "4", "--evals", "2",
                 "--sizes", "16", "--val-examples", "4", "--test-examples", "4", "--workers", "1",
                 "--batch-size", "4"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    (row,) = result["rows"]
    assert row["task"] == "g2p" and row["size"] == 16 and row["seeds"] == [0, 1]
    assert set(row["methods"]) == {"adamw", "sam", "fsam"}
    assert all(s["n"] == 2 and len(s["values"]) == 2 for s in row["methods"].values())
    assert set(row["differences"]) == {"fsam-sam", "sam-adamw", "fsam-adamw"}
    assert (out / "results.png").stat().st_size > 0
    assert "FSAM (κ=0.1) − SAM (κ=1)" in (out / "results.md").read_text()
    assert markdown(result["rows"]) == (out / "results.md").read_text()
