"""``FSAMSeq2SeqTrainer`` (Hugging Face Trainer integration) launched for real: one process,
``torchrun`` (DDP), ``deepspeed --num_gpus 2`` (ZeRO-2, ZeRO-3) and ``accelerate launch`` with an
FSDP2 / FSDP1 config (and FSDP2 through ``TrainingArguments.fsdp`` under torchrun), 2 gloo ranks on
CPU, gradient accumulation 2, a mask refresh every 2 steps inside a 4-step run (refreshes at steps
0 and 2; the checkpoint of step 3 carries the mask of step 2, which the resumed step 3 uses).

* the final weights equal the one-process FSAM Trainer run (same global batch), per tensor
  by the suite's parity rule (``tests/parity.py``; the control: FSAM vs its ρ = 0 run breaks it);
* resuming from the Trainer checkpoint of step 3 ends where the uninterrupted run ends;
* ρ = 0 is the plain ``Seq2SeqTrainer`` bit for bit (also with dropout, one process; not under
  FSDP, which the plain Trainer cannot run on CPU);
* each run says what it was wrapped in (so an FSDP case that silently ran as DDP fails);
* FSAM's figures are in the Trainer's log history; refused Trainer features fail at start-up.

Cost: each launcher is started once; its launch runs every case it is checked on (the run that
saves the checkpoint, the resume from it, plain / ρ = 0) one after the other
(tests/trainer_cases.py), so the launcher and import costs (5-11 s, ~8 s) are paid once per
launcher; the one-process references are computed once per module.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .helpers import free_port, tiny_t5
from .launching import BIN, check, launch
from .parity import assert_not_parity, assert_parity

CASES = "tests/trainer_cases.py"
STEPS, SAVE = 4, 3
LR_STEPS = 0.01 * STEPS
"""Σ lr_t of the cases (trainer_cases.py: lr 0.01 constant, 4 steps): the parity rule's element-wise scale."""


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


def wrapped_in(out: Path, case: str) -> str:
    return (out / case / "wrapping.txt").read_text()


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
    """One process -- this one (no launch: the Trainer stack is imported here anyway), one thread as
    in the launched runs: FSAM, the plain Trainer, FSAM at ρ = 0 (dropout 0 and 0.1)."""
    from . import trainer_cases

    out = tmp_path_factory.mktemp("trainer_single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in ("fsam:", "plain:trainer=plain", "rho0:rho=0",
                     f"plain_dropout:trainer=plain,model={models['dropout']}",
                     f"rho0_dropout:rho=0,model={models['dropout']}"):
            trainer_cases.run(case, out, models["t5"])
    finally:
        torch.set_num_threads(threads)
    return out


def test_one_process_rho0_is_the_plain_trainer_and_metrics_are_logged(single, models):
    assert wrapped_in(single, "fsam") == "single"
    assert bitwise(weights(single, "rho0"), weights(single, "plain"))
    assert bitwise(weights(single, "rho0_dropout"), weights(single, "plain_dropout"))
    # the control for every parity check below: the perturbation moves FSAM outside the rule
    start = start_weights(models["t5"])
    assert_not_parity(weights(single, "fsam"), weights(single, "rho0"), start, LR_STEPS, "FSAM vs rho 0")
    steps = [h for h in history(single, "fsam") if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    for h in steps:
        assert h["perturbed_loss"] > 0 and h["perturbation_norm"] > 0 and h["skipped_steps"] == 0
        assert h["sharpness"] == pytest.approx(h["perturbed_loss"] - h["loss"], abs=1e-4)
        assert h["mask_density"] == pytest.approx(0.1, abs=0.01)
        assert h["grad_norm"] > 0
    plain = [h for h in history(single, "plain") if "loss" in h]
    assert steps[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)   # pass 1 at w: the plain loss


def _parity(out: Path, single: Path, models, case: str, reference: str = "fsam") -> float:
    return assert_parity(weights(out, case), weights(single, reference), start_weights(models["t5"]), LR_STEPS, case)


@pytest.fixture(scope="module")
def torchrun_run(single, models, tmp_path_factory) -> Path:
    """One ``torchrun`` launch: DDP (FSAM saving the mid-run checkpoint, the resume from it, plain,
    ρ = 0), then FSDP2 asked for through ``TrainingArguments(fsdp=..., fsdp_config=...)`` (last:
    accelerate keeps FSDP on for the rest of the process)."""
    out = tmp_path_factory.mktemp("torchrun") / "out"
    run_cases([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], out, models["t5"],
              f"fsam:save_steps={SAVE}", f"resume:resume={out / 'fsam' / f'checkpoint-{SAVE}'}", "plain:trainer=plain",
              "rho0:rho=0", "fsdp_args:fsdp_args=2")
    return out


def test_torchrun_ddp_equals_one_process_resume_and_rho0(single, models, torchrun_run):
    out = torchrun_run
    assert {wrapped_in(out, case) for case in ("fsam", "resume", "plain", "rho0")} == {"ddp"}
    figure = _parity(out, single, models, "fsam")
    resumed = assert_parity(weights(out, "resume"), weights(out, "fsam"), start_weights(models["t5"]), LR_STEPS,
                            "resume")
    print(f"FSAMSeq2SeqTrainer torchrun DDP 2 ranks vs one process: {figure:.1e}; resumed vs uninterrupted: "
          f"{resumed:.1e} (bitwise: {bitwise(weights(out, 'resume'), weights(out, 'fsam'))})")
    assert bitwise(weights(out, "rho0"), weights(out, "plain"))
    assert sorted(p.name for p in (out / "fsam" / f"checkpoint-{SAVE}").glob("fsam_state_*")) == \
        ["fsam_state_rank0-of-2.pt", "fsam_state_rank1-of-2.pt"]


def test_fsdp_through_training_arguments_equals_one_process(single, models, torchrun_run):
    """``--fsdp full_shard --fsdp_config '{"fsdp_version": 2, ...}'`` under torchrun: sharded, and
    where the one-process run ends."""
    assert wrapped_in(torchrun_run, "fsdp_args") == "fsdp2"
    figure = _parity(torchrun_run, single, models, "fsdp_args")
    print(f"FSAMSeq2SeqTrainer torchrun + TrainingArguments.fsdp (FSDP2) 2 ranks vs one process: {figure:.1e}")


@pytest.fixture(scope="module")
def deepspeed_run(single, models, tmp_path_factory) -> Path:
    """One ``deepspeed --num_gpus 2`` launch: ZeRO-2 (FSAM, plain, ρ = 0), then ZeRO-3 (FSAM saving
    the mid-run checkpoint (step SAVE), the resume from it)."""
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
    out, z2, z3 = root / "out", paths[2], paths[3]
    run_cases([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], out, models["t5"],
              f"z2:deepspeed={z2}", f"z2_plain:trainer=plain,deepspeed={z2}", f"z2_rho0:rho=0,deepspeed={z2}",
              f"z3:deepspeed={z3},save_steps={SAVE}",
              f"z3_resume:deepspeed={z3},resume={out / 'z3' / f'checkpoint-{SAVE}'}")
    return out


def test_deepspeed_zero2_equals_one_process_and_rho0_is_plain(single, models, deepspeed_run):
    out = deepspeed_run
    assert {wrapped_in(out, case) for case in ("z2", "z2_plain", "z2_rho0")} == {"deepspeed"}
    figure = _parity(out, single, models, "z2")
    print(f"FSAMSeq2SeqTrainer deepspeed ZeRO-2 2 ranks vs one process: {figure:.1e}")
    assert bitwise(weights(out, "z2_rho0"), weights(out, "z2_plain"))
    assert all("perturbed_loss" in h for h in history(out, "z2") if "loss" in h)


def test_deepspeed_zero3_equals_one_process_and_resumes(single, models, deepspeed_run):
    out = deepspeed_run
    assert wrapped_in(out, "z3") == "deepspeed"
    figure = _parity(out, single, models, "z3")
    resumed = assert_parity(weights(out, "z3_resume"), weights(out, "z3"), start_weights(models["t5"]), LR_STEPS,
                            "resume")
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


FSDP_CONFIG = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1,
               "num_processes": 2, "machine_rank": 0, "mixed_precision": "no", "rdzv_backend": "static",
               "same_network": True, "use_cpu": False}
FSDP2 = {"fsdp_version": 2, "fsdp_reshard_after_forward": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
         "fsdp_transformer_layer_cls_to_wrap": "T5Block", "fsdp_offload_params": False,
         "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False,
         "fsdp_activation_checkpointing": False}
"""The accelerate FSDP config the test writes (that of configs/accelerate/fsdp2.yaml, which the
README's launch command uses)."""


@pytest.fixture(scope="module")
def fsdp_run(single, models, tmp_path_factory) -> Path:
    """One ``accelerate launch`` with an FSDP2 config: FSDP2 (FSAM evaluating before it trains, saving
    the mid-run checkpoint; the resume from it), then the same two under FSDP1 (``fsdp_version=1``:
    the variables the FSDP1 yaml exports)."""
    import yaml

    root = tmp_path_factory.mktemp("fsdp")
    config = root / "fsdp2.yaml"
    config.write_text(yaml.safe_dump({**FSDP_CONFIG, "main_process_port": free_port(), "fsdp_config": FSDP2}))
    out = root / "out"
    run_cases([str(BIN / "accelerate"), "launch", "--config_file", str(config)], out, models["t5"],
              f"fsdp2:save_steps={SAVE},eval_first=1",
              f"fsdp2_resume:resume={out / 'fsdp2' / f'checkpoint-{SAVE}'}",
              f"fsdp1:fsdp_version=1,save_steps={SAVE}",
              f"fsdp1_resume:fsdp_version=1,resume={out / 'fsdp1' / f'checkpoint-{SAVE}'}")
    return out


@pytest.mark.parametrize("version", [2, 1])
def test_accelerate_fsdp_equals_one_process_and_resumes(single, models, fsdp_run, version):
    """accelerate launch with an FSDP config: the Trainer's model is sharded (FSDP2 fully_shard /
    FSDP1 use_orig_params), its checkpoints are accelerate's sharded FSDP ones (DCP) plus FSAM's
    per-rank state; the resumed run ends where the uninterrupted one does (FSDP1: only if the Adam
    moments are restored). No ρ = 0 check here: on CPU the plain Trainer cannot shard -- it runs an
    FSDP config as DDP -- so there is no plain FSDP run to compare with bit for bit."""
    out, name = fsdp_run, f"fsdp{version}"
    assert wrapped_in(out, name) == wrapped_in(out, f"{name}_resume") == name
    checkpoint = out / name / f"checkpoint-{SAVE}"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert sorted(p.name for p in checkpoint.glob("fsam_state_*")) == \
        ["fsam_state_rank0-of-2.pt", "fsam_state_rank1-of-2.pt"]
    figure = _parity(out, single, models, name)
    resumed = assert_parity(weights(out, f"{name}_resume"), weights(out, name), start_weights(models["t5"]), LR_STEPS,
                            "resume")
    print(f"FSAMSeq2SeqTrainer accelerate FSDP{version} 2 ranks vs one process: {figure:.1e}; resumed vs "
          f"uninterrupted: {resumed:.1e} (bitwise: {bitwise(weights(out, f'{name}_resume'), weights(out, name))})")
    logged = [h for h in history(out, name) if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, STEPS + 1))
    if version == 2:   # evaluated before train(): the model was sharded for that evaluation already
        assert json.loads((out / name / "eval_first.json").read_text())["eval_loss"] > 0
    assert all(h["perturbed_loss"] > 0 and h["mask_density"] == pytest.approx(0.1, abs=0.01) for h in logged)


def test_fsdp_launch_on_cpu_without_use_cpu_is_a_start_up_error(models, tmp_path, monkeypatch):
    """Without use_cpu, accelerate on a CPU-only machine makes every process a separate,
    non-distributed run: refused, naming --use_cpu, instead of silently training unsharded copies."""
    from transformers import Seq2SeqTrainingArguments, T5ForConditionalGeneration

    from fsam_dist.integrations.transformers import FSAMArguments, FSAMSeq2SeqTrainer

    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only machines")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=False, report_to=[])
    with pytest.raises(ValueError, match="pass --use_cpu"):
        FSAMSeq2SeqTrainer(model=T5ForConditionalGeneration.from_pretrained(models["t5"]), args=args,
                           fsam_args=FSAMArguments())


@pytest.mark.parametrize("settings, needle", [
    ({"activation_checkpointing": True}, "fsdp_activation_checkpointing: true is not supported"),
    ({"cpu_ram_efficient_loading": True, "sync_module_states": False}, "fsdp_cpu_ram_efficient_loading: true"),
    ({"fsdp_version": 1, "use_orig_params": False}, "fsdp_use_orig_params must be true"),
    ({"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 10}, "fsdp_auto_wrap_policy=SIZE_BASED_WRAP"),
])
def test_unsupported_fsdp_setting_is_named(settings, needle, monkeypatch):
    """What the Trainer's FSDP plugin holds (from an accelerate config or --fsdp) is checked by the
    CLI's FSDP rules when the FSAMTrainer is built: an unsupported setting names its yaml key."""
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")   # the plugin writes it back
    from accelerate.utils import FullyShardedDataParallelPlugin

    from fsam_dist.integrations.transformers import fsdp_settings_from_plugin

    plugin = FullyShardedDataParallelPlugin(**{"fsdp_version": 2, **settings})
    with pytest.raises(ValueError, match=needle):
        fsdp_settings_from_plugin(plugin, "no")


def test_fsdp_plugin_settings_reach_the_wrapper(monkeypatch):
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    from accelerate.utils import FullyShardedDataParallelPlugin

    from fsam_dist.integrations.transformers import fsdp_settings_from_plugin

    two = fsdp_settings_from_plugin(FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=False, transformer_cls_names_to_wrap=["T5Block"],
        auto_wrap_policy="TRANSFORMER_BASED_WRAP"), "bf16")
    assert (two.version, two.reshard_after_forward, two.wrap_classes, two.mixed_precision) == \
        (2, False, ("T5Block",), "bf16")
    one = fsdp_settings_from_plugin(FullyShardedDataParallelPlugin(
        fsdp_version=1, sharding_strategy="SHARD_GRAD_OP", use_orig_params=True, sync_module_states=False), "no")
    assert (one.version, one.sharding_strategy, one.mixed_precision) == (1, "SHARD_GRAD_OP", None)


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
    """examples/run_seq2seq_fsam.py on a local model dir and JSONL files, launched as the README and
    its header say for FSDP2: ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``
    (2 gloo ranks, --use_cpu); sharded checkpoints with FSAM's state, a whole final model."""
    out = tmp_path / "run"
    check(launch([str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/fsdp2.yaml",
                  "--main_process_port", str(free_port()), "examples/run_seq2seq_fsam.py",
                  "--model_name_or_path", tiny_t5_dir,
                  "--train_file", tiny_data["train"], "--validation_file", tiny_data["validation"],
                  "--output_dir", str(out), "--do_train", "--do_eval", "--use_cpu", "--max_steps", "4",
                  "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--logging_steps", "2",
                  "--save_steps", "2", "--report_to", "none", "--max_source_length", "16", "--max_target_length",
                  "16", "--pad_to_max_length", "--rho", "0.05", "--mask_interval", "2"]))
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4] and all("sharpness" in h for h in logged)
    assert sorted(p.name for p in (out / "checkpoint-2").glob("fsam_state_*")) == \
        ["fsam_state_rank0-of-2.pt", "fsam_state_rank1-of-2.pt"]
    assert (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    assert (out / "model.safetensors").is_file() and (out / "eval_results.json").is_file()
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    saved, start = load_file(str(out / "model.safetensors")), T5ForConditionalGeneration.from_pretrained(tiny_t5_dir)
    assert not [n for n, _ in start.named_parameters() if n not in saved]
    assert all(saved[n].shape == p.shape for n, p in start.named_parameters())
    assert any(not torch.equal(saved[n], p) for n, p in start.named_parameters())   # trained
