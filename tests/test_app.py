"""The fine-tuning app end to end: a 2-rank run that learns, with metrics, predictions and a plot."""

from __future__ import annotations

import json

import pytest

from fsam_dist.plot import main as plot_main

from .launching import BIN, REPO, check, launch, write_config

TRAIN = str(REPO / "launch" / "train.py")


@pytest.mark.slow
def test_two_rank_run_learns_and_writes_metrics_predictions_and_plot(tmp_path, tiny_t5_dir, tiny_data):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, out,
                       optim={"lr": 3e-3, "clip_grad_norm": 1.0, "warmup_steps": 5},
                       fsam={"rho": 0.05, "keep_ratio": 0.1, "mask_interval": 10},
                       train={"max_steps": 60, "micro_batch_size": 8, "eval_every": 30, "tensorboard": True},
                       eval={"enabled": True, "at_start": True, "max_new_tokens": 12, "batch_size": 12},
                       backend={"name": "ddp"})
    check(launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", TRAIN, "--config", str(cfg)]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = {r["step"]: r for r in records if "eval/chrf" in r}
    assert [r["step"] for r in train] == list(range(1, 61))
    for key in ("loss", "perturbed_loss", "sharpness", "grad_norm", "perturbation_norm", "skipped", "lr",
                "step_time", "target_tokens_per_s"):
        assert key in train[-1], key
    refreshes = [r for r in train if r.get("mask_refreshed")]
    assert len(refreshes) == 6 and all(0 <= r["mask_jaccard"] <= 1 for r in refreshes[1:])
    assert sorted(evals) == [0, 30, 60]
    assert evals[60]["eval/chrf"] > evals[0]["eval/chrf"] + 5, evals
    predictions = [json.loads(line) for line in (out / "predictions" / "step-60.jsonl").read_text().splitlines()]
    assert len(predictions) == 24 and all({"source", "target", "prediction"} <= p.keys() for p in predictions)
    assert any((out / "tensorboard").iterdir())
    png = tmp_path / "compare.png"
    assert plot_main([str(out), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_names_the_metrics_the_runs_have_when_asked_for_a_missing_one(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 1, "eval/chrf": 10.0, "eval/per": 50.0}\n')
    assert plot_main([str(run), "-o", str(tmp_path / "a.png"), "--metric", "eval/chfr"]) == 2
    err = capsys.readouterr().err
    assert "'eval/chfr': no run has it" in err and "eval/chrf, eval/per" in err
    assert not (tmp_path / "a.png").exists()
    assert plot_main([str(run), "-o", str(tmp_path / "b.png"), "--metric", "per"]) == 0   # eval/ prefix optional
