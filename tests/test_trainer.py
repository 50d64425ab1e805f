"""``FSAMSeq2SeqTrainer`` (Hugging Face Trainer integration) launched for real: one process,
``torchrun`` (DDP) and ``deepspeed --num_gpus 2`` (ZeRO-2, ZeRO-3), 2 gloo ranks on CPU, gradient
accumulation 2, a mask refresh every 2 steps inside a 6-step run.

* the final weights equal the one-process FSAM Trainer run (same global batch), per tensor
  by the suite's parity rule (``tests/parity.py``; the control: FSAM vs its ρ = 0 run breaks it);
* resuming from the Trainer checkpoint of step 3 ends where the uninterrupted run ends;
* ρ = 0 is the plain ``Seq2SeqTrainer`` bit for bit (also with dropout, one process);
* FSAM's figures are in the Trainer's log history; refused Trainer features fail at start-up.

Several Trainer runs share one launch (tests/trainer_cases.py) to keep the launcher and import
costs (5-11 s, ~8 s) down.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .helpers import free_port, tiny_t5
from .launching import BIN, PYTHON, check, launch
from .parity import assert_not_parity, assert_parity

CASES = "tests/trainer_cases.py"
LR_STEPS = 0.01 * 6
"""Σ lr_t of the cases (trainer_cases.py: lr 0.01 constant, 6 steps): the parity rule's element-wise scale."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("trainer_models")
    tiny_t5(seed=0).save_pretrained(root / "t5")
    tiny_t5(seed=0, dropout=0.1).save_pretrained(root / "t5-dropout")
    return {"t5": str(root / "t5"), "dropout": str(root / "t5-dropout")}


def run_cases(launcher: list[str], out: Path, model: str, *cases: str) -> subprocess.CompletedProcess:
    args = [*launcher, CASES, "--out", str(out), "--model", model]
    for case in cases:
        args += ["--case", case]
    return check(launch(args, timeout=900))


def weights(out: Path, case: str) -> dict[str, torch.Tensor]:
    return torch.load(out / case / "final.pt", weights_only=True)


def history(out: Path, case: str) -> list[dict]:
    return json.loads((out / case / "log_history.json").read_text())


def start_weights(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import T5ForConditionalGeneration

    return {n: p.detach().clone() for n, p in T5ForConditionalGeneration.from_pretrained(model_dir).named_parameters()}


def bitwise(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def single(models, tmp_path_factory) -> Path:
    """One process: FSAM, the plain Trainer, FSAM at ρ = 0 (dropout 0 and 0.1)."""
    out = tmp_path_factory.mktemp("trainer_single")
    run_cases([PYTHON], out, models["t5"], "fsam:", "plain:trainer=plain", "rho0:rho=0",
              f"plain_dropout:trainer=plain,model={models['dropout']}", f"rho0_dropout:rho=0,model={models['dropout']}")
    return out


def test_one_process_rho0_is_the_plain_trainer_and_metrics_are_logged(single, models):
    assert bitwise(weights(single, "rho0"), weights(single, "plain"))
    assert bitwise(weights(single, "rho0_dropout"), weights(single, "plain_dropout"))
    # the control for every parity check below: the perturbation moves FSAM outside the rule
    start = start_weights(models["t5"])
    assert_not_parity(weights(single, "fsam"), weights(single, "rho0"), start, LR_STEPS, "FSAM vs rho 0")
    steps = [h for h in history(single, "fsam") if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    for h in steps:
        assert h["perturbed_loss"] > 0 and h["perturbation_norm"] > 0 and h["skipped_steps"] == 0
        assert h["sharpness"] == pytest.approx(h["perturbed_loss"] - h["loss"], abs=1e-4)
        assert h["mask_density"] == pytest.approx(0.1, abs=0.01)
        assert h["grad_norm"] > 0
    plain = [h for h in history(single, "plain") if "loss" in h]
    assert steps[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)   # pass 1 at w: the plain loss


def _parity(out: Path, single: Path, models, case: str, reference: str = "fsam") -> float:
    return assert_parity(weights(out, case), weights(single, reference), start_weights(models["t5"]), LR_STEPS, case)


def test_torchrun_ddp_equals_one_process_resume_and_rho0(single, models, tmp_path):
    out = tmp_path / "ddp"
    run_cases([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], out, models["t5"],
              "fsam:save_steps=3", f"resume:resume={out / 'fsam' / 'checkpoint-3'}", "plain:trainer=plain",
              "rho0:rho=0")
    figure = _parity(out, single, models, "fsam")
    resumed = assert_parity(weights(out, "resume"), weights(out, "fsam"), start_weights(models["t5"]), LR_STEPS, "resume")
    print(f"FSAMSeq2SeqTrainer torchrun DDP 2 ranks vs one process: {figure:.1e}; resumed vs uninterrupted: "
          f"{resumed:.1e} (bitwise: {bitwise(weights(out, 'resume'), weights(out, 'fsam'))})")
    assert bitwise(weights(out, "rho0"), weights(out, "plain"))
    assert sorted(p.name for p in (out / "fsam" / "checkpoint-3").glob("fsam_state_*")) == \
        ["fsam_state_rank0-of-2.pt", "fsam_state_rank1-of-2.pt"]


@pytest.fixture(scope="module")
def deepspeed_configs(tmp_path_factory) -> dict[int, str]:
    from .helpers import unavailable

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        unavailable("deepspeed is not installed (pip install 'fsam-dist[deepspeed]')")
    root = tmp_path_factory.mktemp("ds")
    paths = {}
    for stage in (2, 3):
        config = {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                  "fp16": {"enabled": "auto"}, "steps_per_print": 10 ** 9}
        paths[stage] = str(root / f"zero{stage}.json")
        Path(paths[stage]).write_text(json.dumps(config))
    return paths


def test_deepspeed_zero2_equals_one_process_and_rho0_is_plain(single, models, deepspeed_configs, tmp_path):
    out, ds = tmp_path / "z2", deepspeed_configs[2]
    run_cases([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], out, models["t5"],
              f"fsam:deepspeed={ds}", f"plain:trainer=plain,deepspeed={ds}", f"rho0:rho=0,deepspeed={ds}")
    figure = _parity(out, single, models, "fsam")
    print(f"FSAMSeq2SeqTrainer deepspeed ZeRO-2 2 ranks vs one process: {figure:.1e}")
    assert bitwise(weights(out, "rho0"), weights(out, "plain"))
    assert all("perturbed_loss" in h for h in history(out, "fsam") if "loss" in h)


def test_deepspeed_zero3_equals_one_process_and_resumes(single, models, deepspeed_configs, tmp_path):
    out, ds = tmp_path / "z3", deepspeed_configs[3]
    run_cases([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], out, models["t5"],
              f"fsam:deepspeed={ds},save_steps=3", f"resume:deepspeed={ds},resume={out / 'fsam' / 'checkpoint-3'}")
    figure = _parity(out, single, models, "fsam")
    resumed = assert_parity(weights(out, "resume"), weights(out, "fsam"), start_weights(models["t5"]), LR_STEPS, "resume")
    print(f"FSAMSeq2SeqTrainer deepspeed ZeRO-3 2 ranks vs one process: {figure:.1e}; resumed vs uninterrupted: "
          f"{resumed:.1e}")


@pytest.mark.parametrize("field, value, needle", [
    ("optim", "lomo", "optim='lomo' updates the weights inside backward"),
    ("optim", "galore_adamw_layerwise", "optim='galore_adamw_layerwise' updates the weights inside backward"),
    ("fp16", True, "fp16=True"),
    ("torch_compile", True, "torch_compile=True"),
])
def test_refused_trainer_feature_is_a_start_up_error(models, tmp_path, field, value, needle):
    from transformers import Seq2SeqTrainingArguments, T5ForConditionalGeneration

    from fsam_dist.integrations.transformers import FSAMArguments, FSAMSeq2SeqTrainer

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("*", r"\*")):
        FSAMSeq2SeqTrainer(model=T5ForConditionalGeneration.from_pretrained(models["t5"]), args=args,
                           fsam_args=FSAMArguments())


def test_fsdp_on_cpu_is_a_start_up_error(models, tmp_path, monkeypatch):
    """accelerate does not shard on CPU: an accelerate FSDP launch is refused, not run as DDP."""
    from transformers import Seq2SeqTrainingArguments, T5ForConditionalGeneration

    from fsam_dist.integrations.transformers import FSAMArguments, FSAMSeq2SeqTrainer

    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only machines")
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP .* on CPU is not supported"):
        FSAMSeq2SeqTrainer(model=T5ForConditionalGeneration.from_pretrained(models["t5"]), args=args,
                           fsam_args=FSAMArguments())


def test_fsam_arguments_parse_next_to_training_arguments_and_are_validated(tmp_path):
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    from fsam_dist.config import ConfigError
    from fsam_dist.integrations.transformers import FSAMArguments

    parser = HfArgumentParser((Seq2SeqTrainingArguments, FSAMArguments))
    _, fsam = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--rho", "0.1", "--keep_ratio",
                                                  "0.2", "--exclude", "bias", "norm", "--norm", "masked"])
    assert (fsam.rho, fsam.keep_ratio, fsam.exclude, fsam.norm) == (0.1, 0.2, ["bias", "norm"], "masked")
    with pytest.raises(ConfigError, match="fsam_args.keep_ratio"):
        FSAMArguments(keep_ratio=0.0)


def test_example_script_trains_evaluates_and_logs_fsam(tiny_t5_dir, tiny_data, tmp_path):
    """examples/run_seq2seq_fsam.py on a local model dir and JSONL files, one process."""
    out = tmp_path / "run"
    check(launch([PYTHON, "examples/run_seq2seq_fsam.py", "--model_name_or_path", tiny_t5_dir,
                  "--train_file", tiny_data["train"], "--validation_file", tiny_data["validation"],
                  "--output_dir", str(out), "--do_train", "--do_eval", "--use_cpu", "--max_steps", "4",
                  "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--logging_steps", "2",
                  "--save_steps", "2", "--report_to", "none", "--max_source_length", "16", "--max_target_length",
                  "16", "--pad_to_max_length", "--rho", "0.05", "--mask_interval", "2"]))
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4] and all("sharpness" in h for h in logged)
    assert (out / "checkpoint-2" / "fsam_state_rank0-of-1.pt").is_file()
    assert (out / "model.safetensors").is_file() and (out / "eval_results.json").is_file()
