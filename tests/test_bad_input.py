"""Bad input is one clear error naming the field or file, before any process group starts, and
leaves no output directory behind (a later ``resume: auto`` must find nothing half-written)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from .launching import REPO, write_config

TRAIN = str(REPO / "launch" / "train.py")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
               "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "ACCELERATE_USE_FSDP", "FSDP_VERSION",
               "FSDP_SHARDING_STRATEGY", "FSDP_USE_ORIG_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING",
               "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD")


def _main():
    spec = importlib.util.spec_from_file_location("launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _set(path: str, value):
    def apply(cfg, tmp):
        node = cfg
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value(tmp) if callable(value) else value
    return apply


def _drop(path: str):
    def apply(cfg, tmp):
        section, key = path.split(".") if "." in path else (None, path)
        (cfg[section] if section else cfg).pop(key)
    return apply


def _file(name: str, text: str):
    def make(tmp: Path) -> str:
        (tmp / name).write_text(text)
        return str(tmp / name)
    return make


def _ds_json(content: dict):
    return _file("ds.json", json.dumps(content))


def _model_without(files: list[str], edit=None):
    """A copy of the tiny model directory without some files (or with its tokenizer edited)."""
    def make(tmp: Path) -> str:
        src = Path(CASES_MODEL_DIR[0])
        dst = tmp / "broken_model"
        shutil.copytree(src, dst)
        for name in files:
            (dst / name).unlink()
        if edit:
            edit(dst)
        return str(dst)
    return make


def _strip_pad(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["pad_token"] = None
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["padding"] = None
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    special = model_dir / "special_tokens_map.json"
    if special.is_file():
        tokens = json.loads(special.read_text())
        tokens.pop("pad_token", None)
        special.write_text(json.dumps(tokens))


CASES_MODEL_DIR: list[str] = []
DS = _set("backend.name", "deepspeed")
TWO_RANKS = {"RANK": "0", "WORLD_SIZE": "2"}
FSDP1_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
             "FSDP_USE_ORIG_PARAMS": "true"}

# (id, config edits, launcher environment, text the single error message must contain)
CASES = [
    ("unknown-top-level-key", [_set("trainer", {"max_steps": 3})], {}, "trainer: unknown key"),
    ("unknown-nested-key", [_set("fsam.rhoo", 0.1)], {}, "fsam.rhoo: unknown key"),
    ("wrong-type", [_set("train.max_steps", "ten")], {}, "train.max_steps"),
    ("negative-rho", [_set("fsam.rho", -0.05)], {}, "fsam.rho"),
    ("zero-keep-ratio", [_set("fsam.keep_ratio", 0)], {}, "fsam.keep_ratio"),
    ("keep-ratio-above-one", [_set("fsam.keep_ratio", 1.5)], {}, "fsam.keep_ratio"),
    ("zero-mask-interval", [_set("fsam.mask_interval", 0)], {}, "fsam.mask_interval"),
    ("bad-norm", [_set("fsam.norm", "l1")], {}, "fsam.norm"),
    ("bad-exclude-regex", [_set("fsam.exclude", ["(bias"])], {}, "fsam.exclude"),
    ("looksam-without-interval", [_set("fsam.reuse_direction", True)], {}, "reuse_direction: true needs interval > 1"),
    ("negative-reuse-alpha", [_set("fsam.interval", 4), _set("fsam.reuse_direction", True),
                              _set("fsam.reuse_alpha", -0.5)], {}, "fsam.reuse_alpha"),
    ("bad-precision", [_set("train.precision", "fp8")], {}, "train.precision"),
    ("zero-lr", [_set("optim.lr", 0)], {}, "optim.lr"),
    ("bad-betas", [_set("optim.betas", [0.9])], {}, "optim.betas"),
    ("zero-micro-batch", [_set("train.micro_batch_size", 0)], {}, "train.micro_batch_size"),
    ("missing-model-section", [_drop("model")], {}, "model: Field required"),
    ("missing-model-dir", [_set("model.name_or_path", "/nonexistent/t5")], {}, "/nonexistent/t5"),
    ("model-dir-without-config", [_set("model.name_or_path", _model_without(["config.json"]))], {}, "config.json"),
    ("tokenizer-without-pad", [_set("model.name_or_path", _model_without([], _strip_pad))], {}, "pad token"),
    ("missing-train-file", [_set("data.train_file", "/nonexistent/train.jsonl")], {}, "/nonexistent/train.jsonl"),
    ("empty-jsonl", [_set("data.train_file", _file("empty.jsonl", ""))], {}, "empty.jsonl"),
    ("malformed-jsonl", [_set("data.train_file", _file("bad.jsonl", "{not json\n[1, 2\n"))], {}, "bad.jsonl"),
    ("missing-field", [_set("data.train_file", _file("nofield.jsonl", '{"source": "a b"}\n' * 5))], {},
     "nofield.jsonl"),
    ("half-the-rows-malformed", [_set("data.train_file", _file("half.jsonl", '{"source": "a", "target": "b"}\n'
                                                                   '{"source": "c", "target": \n'))], {},
     "half.jsonl: 1 of 2 rows (50.0%) cannot be read (1× malformed JSON; first at lines 2)"),
    ("bad-row-share-out-of-range", [_set("data.max_bad_row_fraction", 1.5)], {}, "data.max_bad_row_fraction"),
    ("missing-eval-file", [_set("data.eval_file", "/nonexistent/valid.jsonl"), _set("eval.enabled", True)], {},
     "data.eval_file"),
    ("all-targets-too-long", [_set("data.max_target_length", 2)], {}, "data.max_target_length"),
    ("unknown-builtin", [_set("data.train_file", "builtin:nosuchcorpus")], {}, "nosuchcorpus"),
    ("world-larger-than-dataset", [_set("backend.name", "ddp")], {"RANK": "0", "WORLD_SIZE": "500"},
     "500 processes"),
    ("deepspeed-without-launcher", [_set("backend.name", "deepspeed"),
                                    _set("backend.deepspeed_config", "configs/deepspeed/zero2.json")], {},
     "needs a distributed launcher"),
    ("ddp-without-launcher", [_set("backend.name", "ddp")], {}, "needs a distributed launcher"),
    ("single-with-two-processes", [_set("backend.name", "single")], TWO_RANKS, "backend.name: 'single'"),
    ("deepspeed-without-json", [DS], TWO_RANKS, "backend.deepspeed_config"),
    ("deepspeed-json-missing", [DS, _set("backend.deepspeed_config", "/nonexistent/ds.json")], TWO_RANKS,
     "/nonexistent/ds.json"),
    ("deepspeed-json-invalid", [DS, _set("backend.deepspeed_config", _file("ds.json", "{stage: 2"))], TWO_RANKS,
     "not valid JSON"),
    ("deepspeed-json-micro-batch", [DS, _set("backend.deepspeed_config",
                                         _ds_json({"train_micro_batch_size_per_gpu": 16}))], TWO_RANKS,
     "train_micro_batch_size_per_gpu = 16 disagrees with train.micro_batch_size"),
    ("deepspeed-json-clipping", [DS, _set("backend.deepspeed_config", _ds_json({"gradient_clipping": 1.0}))],
     TWO_RANKS, "gradient_clipping = 1.0 disagrees with optim.clip_grad_norm"),
    ("deepspeed-json-optimizer", [DS, _set("backend.deepspeed_config",
                                       _ds_json({"optimizer": {"type": "AdamW"}}))], TWO_RANKS,
     "remove 'optimizer'"),
    ("deepspeed-json-precision", [DS, _set("backend.deepspeed_config", _ds_json({"bf16": {"enabled": True}}))],
     TWO_RANKS, "bf16.enabled = True disagrees with train.precision"),
    ("deepspeed-json-bad-stage", [DS, _set("backend.deepspeed_config",
                                       _ds_json({"zero_optimization": {"stage": 4}}))], TWO_RANKS,
     "zero_optimization.stage"),
    ("fsdp-without-orig-params", [_set("backend.name", "fsdp")],
     {**TWO_RANKS, **FSDP1_ENV, "FSDP_USE_ORIG_PARAMS": "false"}, "fsdp_use_orig_params must be true"),
    ("fsdp-hybrid-sharding", [_set("backend.name", "fsdp")],
     {**TWO_RANKS, **FSDP1_ENV, "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "hybrid sharding"),
    ("fsdp-activation-checkpointing-offload", [_set("backend.name", "fsdp")],
     {**TWO_RANKS, **FSDP1_ENV, "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"},
     "fsdp_activation_checkpointing_offload"),
    ("fp16-on-cpu", [_set("train.precision", "fp16")], {}, "train.precision: fp16 is not supported"),
    ("fp16-with-deepspeed", [DS, _set("backend.deepspeed_config", "configs/deepspeed/zero2.json"),
                             _set("train.precision", "fp16")], TWO_RANKS, "train.precision: fp16 is not supported"),
    ("deepspeed-json-fp16", [DS, _set("backend.deepspeed_config", _ds_json({"fp16": {"enabled": True}}))],
     TWO_RANKS, "fp16.enabled is set, but fp16 is not supported"),
    ("deepspeed-json-offload-optimizer", [DS, _set("backend.deepspeed_config", _ds_json(
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))], TWO_RANKS,
     "zero_optimization.offload_optimizer is not supported"),
    ("deepspeed-json-offload-param", [DS, _set("backend.deepspeed_config", _ds_json(
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))], TWO_RANKS,
     "zero_optimization.offload_param is not supported"),
    ("deepspeed-json-hpz", [DS, _set("backend.deepspeed_config", _ds_json(
        {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}))], TWO_RANKS,
     "zero_optimization.zero_hpz_partition_size is not supported"),
    ("deepspeed-json-quantized-weights", [DS, _set("backend.deepspeed_config", _ds_json(
        {"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}))], TWO_RANKS,
     "zero_optimization.zero_quantized_weights is not supported"),
    ("deepspeed-json-quantized-gradients", [DS, _set("backend.deepspeed_config", _ds_json(
        {"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}))], TWO_RANKS,
     "zero_optimization.zero_quantized_gradients is not supported"),
    ("resume-not-a-checkpoint", [_set("train.resume", _file("ckpt", "x"))], {}, "train.resume"),
    # a relative path that does not exist yet (the shipped example's runs/t5-small) is not a hub id
    ("model-path-not-made-yet", [_set("model.name_or_path", "runs/no-such-model-yet")], {},
     "model.name_or_path: 'runs/no-such-model-yet' does not exist"),
]


@pytest.mark.parametrize("edits,environment,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_before_any_process_group(tmp_path, tiny_t5_dir, tiny_data, capsys,
                                                               monkeypatch, edits, environment, needle):
    CASES_MODEL_DIR[:] = [tiny_t5_dir]
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in environment.items():
        monkeypatch.setenv(var, value)
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out")
    cfg = yaml.safe_load(cfg_path.read_text())
    for edit in edits:
        edit(cfg, tmp_path)
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert _main()(["--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    # (transformers may print a weight-loading progress bar first)
    assert err.count("error: ") == 1 and needle in err[err.index("error: "):], err
    assert not dist.is_initialized(), "the error must come before any process group starts"
    assert not (tmp_path / "out").exists(), "a failed start must not leave an output directory"


def test_a_few_bad_rows_are_skipped_with_a_warning_and_more_are_one_error(tmp_path, caplog):
    """Under data.max_bad_row_fraction the bad rows are counted, skipped and warned about; over
    it, one error names the file, the count and the first line numbers."""
    from fsam_dist.seq2seq.data import TooManyBadRows, load_examples

    good = '{"source": "a", "target": "b"}\n'
    path = tmp_path / "train.jsonl"
    path.write_text(good * 99 + "{broken\n")
    with caplog.at_level("WARNING", logger="fsam_dist.seq2seq.data"):
        examples, report = load_examples(str(path), "train", max_bad_fraction=0.01)
    assert len(examples) == 99 and report.n_bad == 1 and report.bad_lines == {"malformed JSON": [100]}
    assert "1 malformed JSON (lines 100)" in caplog.text
    path.write_text(good * 97 + "{broken\n" + good + "[1]\n" + "{broken\n")
    with pytest.raises(TooManyBadRows, match=r"train.jsonl: 3 of 101 rows .* first at lines 98, 100, 101\), "
                                             r"more than the 1.0% allowed by data.max_bad_row_fraction"):
        load_examples(str(path), "train", max_bad_fraction=0.01)
    assert len(load_examples(str(path), "train", max_bad_fraction=1.0)[0]) == 98


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("value", [None, "None", "null", 0])
def test_clip_grad_norm_null_or_none_is_off(tmp_path, tiny_t5_dir, tiny_data, value):
    """Hugging Face users write null/None for 'no clipping'."""
    from fsam_dist.config import load_config

    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out", optim={"clip_grad_norm": value})
    assert load_config(cfg).optim.clip_grad_norm == 0.0
    assert load_config(cfg, [f"optim.clip_grad_norm={value}"]).optim.clip_grad_norm == 0.0


def test_missing_config_file_and_non_mapping_yaml(tmp_path, capsys):
    assert _main()(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert _main()(["--config", str(tmp_path / "list.yaml")]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_deepspeed_config_without_deepspeed_installed_names_the_extra(tmp_path, tiny_t5_dir, tiny_data, capsys,
                                                                       monkeypatch):
    """DeepSpeed is an extra: a DDP/FSDP-only install that is given a DeepSpeed JSON gets the pip command."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_t5_dir, tiny_data, tmp_path / "out",
                       backend={"deepspeed_config": "configs/deepspeed/zero2.json"})
    assert _main()(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed is not installed" in err and "fsam-dist[deepspeed]" in err, err
    assert not dist.is_initialized()
