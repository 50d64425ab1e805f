"""launch/train.py end to end: one process, torchrun DDP, resume, and bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest

from .helpers import free_port
from .launching import BIN, PYTHON, REPO, assert_final_close, assert_final_identical, check, launch, write_config

TRAIN = str(REPO / "launch" / "train.py")


def _load_main():
    spec = importlib.util.spec_from_file_location("launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_t5_dir, tiny_data):
    """The single-process reference: 10 steps, global batch 8, mask refresh every 4."""
    root = tmp_path_factory.mktemp("single")
    cfg = write_config(root / "cfg.yaml", tiny_t5_dir, tiny_data, root / "out",
                       train={"micro_batch_size": 8, "save_every": 5})
    check(launch([PYTHON, TRAIN, "--config", str(cfg)]))
    return root / "out"


@pytest.mark.slow
def test_single_process_run_writes_metrics_checkpoints_and_final(single_run):
    records = [json.loads(line) for line in (single_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(r["skipped"] == 0 and r["perturbed_loss"] >= 0 for r in records)
    assert sum(r.get("mask_refreshed", 0) for r in records) == 3          # steps 0, 4, 8
    assert records[-1]["loss"] < records[0]["loss"]
    assert (single_run / "final" / "model.safetensors").is_file()
    assert (single_run / "final" / "tokenizer_config.json").is_file()
    steps = sorted(p.name for p in (single_run / "checkpoints").iterdir())
    assert steps == ["step-10", "step-5"]


@pytest.mark.slow
def test_torchrun_ddp_with_accumulation_equals_one_process(single_run, tmp_path, tiny_t5_dir, tiny_data):
    """2 ranks × 2 micro-batches of 2 == one process with micro-batch 8 (global batch 8)."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out",
                       train={"micro_batch_size": 2, "grad_accum_steps": 2}, backend={"name": "ddp"})
    check(launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", TRAIN, "--config", str(cfg)]))
    assert_final_close(tmp_path / "out", single_run, "DDP vs one process")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2])
def test_deepspeed_launcher_equals_one_process(single_run, tmp_path, tiny_t5_dir, tiny_data, stage):
    """`deepspeed --num_gpus 2 launch/train.py` (CPU, gloo) with our ZeRO JSON == one process.
    ZeRO-3 through the same launcher, JSON (configs/deepspeed/zero3.json), 2 × 2 micro-batches, mask
    refreshes and checkpoints is test_reliability.py's zero3 run (parity with one process, skipped
    steps bit-identical in its checkpoints); the ZeRO-3 adapter on this tiny T5 is test_deepspeed.py's."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out",
                       train={"micro_batch_size": 2, "grad_accum_steps": 2, "save_every": 5},
                       backend={"deepspeed_config": f"configs/deepspeed/zero{stage}.json"})
    result = check(launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
                           "--config", str(cfg)], env={"OMP_NUM_THREADS": ""}))
    assert_final_close(tmp_path / "out", single_run, f"ZeRO-{stage} (deepspeed launcher) vs one process")
    assert "backend deepspeed, 2 process(es)" in result.stderr + result.stdout
    assert (tmp_path / "out" / "checkpoints" / "step-5" / "COMPLETE").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fsdp2", "fsdp1"])
def test_accelerate_fsdp_equals_one_process(single_run, tmp_path, tiny_t5_dir, tiny_data, variant):
    """accelerate launch with our FSDP yaml: 2 ranks × 2 micro-batches == one process (with checkpoints)."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out",
                       train={"micro_batch_size": 2, "grad_accum_steps": 2, "save_every": 5})
    check(launch([str(BIN / "accelerate"), "launch", "--config_file", f"configs/accelerate/{variant}.yaml",
                  "--num_processes", "2", "--main_process_port", "0", TRAIN, "--config", str(cfg)]))
    assert_final_close(tmp_path / "out", single_run, f"{variant} vs one process")
    assert (tmp_path / "out" / "checkpoints" / "step-5" / "COMPLETE").is_file()


@pytest.mark.slow
def test_gradient_checkpointing_run_equals_the_run_without_it(single_run, tmp_path, tiny_t5_dir, tiny_data):
    """``train.gradient_checkpointing: true`` on FSDP2 (torchrun, 2 ranks × 2 micro-batches, FSAM
    at ρ 0.05) == the one-process run without it (parity rule); the run reports checkpointing on
    in every transformer block of the model it trains (read from the model's own flags)."""
    from transformers import AutoConfig

    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out",
                       train={"micro_batch_size": 2, "grad_accum_steps": 2, "gradient_checkpointing": True},
                       backend={"name": "fsdp"})
    result = check(launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", TRAIN, "--config", str(cfg)]))
    config = AutoConfig.from_pretrained(tiny_t5_dir)
    blocks = config.num_layers + config.num_decoder_layers
    on = re.search(r"gradient checkpointing on in (\d+) of (\d+) layers", result.stderr)
    assert on and on[1] == on[2] and int(on[1]) >= blocks, result.stderr[-3000:]
    assert "backend fsdp, 2 process(es)" in result.stderr
    assert_final_close(tmp_path / "out", single_run, "FSDP2 with gradient checkpointing vs one process without")


@pytest.mark.slow
def test_resume_equals_uninterrupted(single_run, tmp_path):
    """Delete what came after step 5 and resume: the uninterrupted run's final weights, bit for bit."""
    run = tmp_path / "out"
    shutil.copytree(single_run, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-10")
    # a half-written newer checkpoint (crash mid-write) must be ignored by resume: auto
    (run / "checkpoints" / ".tmp-step-8" / "backend").mkdir(parents=True)
    (run / "checkpoints" / "step-9").mkdir()          # renamed but without COMPLETE: ignored too
    config = json.loads((run / "config.json").read_text())
    config["train"]["output_dir"] = str(run)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(config))
    result = check(launch([PYTHON, TRAIN, "--config", str(cfg)]))
    assert "resumed from" in result.stderr and "step-5" in result.stderr
    assert_final_identical(run, single_run)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_a_different_run(single_run, tmp_path):
    """Rerunning a rho sweep into the same output_dir must not continue the old run silently:
    one error naming the differing field and the way out; train.resume=force continues it."""
    run = tmp_path / "out"
    shutil.copytree(single_run, run)
    shutil.rmtree(run / "checkpoints" / "step-10")
    shutil.rmtree(run / "final")
    config = json.loads((run / "config.json").read_text())
    config["train"]["output_dir"] = str(run)
    config["fsam"]["rho"] = 0.1
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(config))
    result = launch([PYTHON, TRAIN, "--config", str(cfg)])
    assert result.returncode == 2, result.stderr
    assert "belongs to a different run (fsam.rho: 0.05 → 0.1)" in result.stderr
    assert "train.resume=force" in result.stderr and not (run / "final").exists()
    result = check(launch([PYTHON, TRAIN, "--config", str(cfg), "train.resume=force"]))
    assert "resumed from" in result.stderr and "step-5" in result.stderr


def test_run_fingerprint_ignores_how_the_global_batch_is_split():
    from fsam_dist.config import Config
    from fsam_dist.train.checkpoint import run_fingerprint

    def fingerprint(world, **train):
        cfg = Config.model_validate({"model": {"name_or_path": "m"}, "data": {"train_file": "t"}, "train": train})
        return run_fingerprint(cfg.model_dump(), world)

    base = fingerprint(2, micro_batch_size=4, grad_accum_steps=2)
    assert fingerprint(4, micro_batch_size=2, grad_accum_steps=2) == base          # same global batch 16
    assert fingerprint(4, micro_batch_size=4, grad_accum_steps=2) != base          # 32
    assert fingerprint(2, micro_batch_size=4, grad_accum_steps=2, output_dir="x", save_every=3) == base
    assert fingerprint(2, micro_batch_size=4, grad_accum_steps=2, max_steps=7) != base   # linear decay to max_steps


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["train"].update(max_step=3), "train.max_step: unknown key"),
    (lambda c: c["train"].update(max_steps="ten"), "train.max_steps"),
    (lambda c: c["fsam"].update(keep_ratio=2), "fsam.keep_ratio"),
    (lambda c: c["model"].update(name_or_path="/nonexistent/model"), "/nonexistent/model"),
    (lambda c: c["data"].update(train_file="/nonexistent/train.jsonl"), "/nonexistent/train.jsonl"),
    (lambda c: c["backend"].update(name="deepspeed", deepspeed_config="configs/deepspeed/zero2.json"),
     "needs a distributed launcher"),
    (lambda c: c["backend"].update(name="ddp"), "needs a distributed launcher"),
    (lambda c: c.pop("model"), "model: Field required"),
])
def test_bad_config_is_one_clear_error(tmp_path, tiny_t5_dir, tiny_data, capsys, monkeypatch, mutate, needle):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out")
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.setdefault("backend", {})
    mutate(cfg)
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _load_main()(["--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "out").exists(), "a failed start must not leave an output directory"


def test_deepspeed_json_disagreeing_with_train_is_an_error(tmp_path, tiny_t5_dir, tiny_data, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 16,
                              "gradient_clipping": 1.0}))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out",
                       backend={"name": "deepspeed", "deepspeed_config": str(ds)})
    assert _load_main()(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu = 16 disagrees with train.micro_batch_size = 4" in err, err


def test_overrides_and_unknown_override(tmp_path, tiny_t5_dir, tiny_data):
    from fsam_dist.config import ConfigError, load_config

    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out")
    loaded = load_config(cfg, ["fsam.rho=0.1", "train.max_steps=3", "fsam.exclude=[bias]"])
    assert (loaded.fsam.rho, loaded.train.max_steps, loaded.fsam.exclude) == (0.1, 3, ["bias"])
    with pytest.raises(ConfigError, match="fsam.rhoo: unknown key"):
        load_config(cfg, ["fsam.rhoo=0.1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(cfg, ["fsam.rho"])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_skipped_with_a_warning(single_run, tmp_path, damage, caplog):
    from fsam_dist.train import checkpoint

    run = tmp_path / "out"
    shutil.copytree(single_run, run)
    newest = run / "checkpoints" / "step-10"
    target = next(p for p in sorted(newest.rglob("*.pt")))
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    else:
        target.unlink()
    with caplog.at_level("WARNING", logger="fsam_dist"):
        chosen = checkpoint.latest_checkpoint(run)
    assert chosen == run / "checkpoints" / "step-5"
    assert target.name in caplog.text and "skipping damaged checkpoint" in caplog.text
    assert checkpoint.verify(run / "checkpoints" / "step-5") is None
