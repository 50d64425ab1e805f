"""Code that runs on GPUs in users' hands, checked on the CPU (issue 17): where tensors live,
which device each rank picks, what waits on the host, and the CPU mode of bench/gpu_check.py.

No GPU is needed: ``torch.cuda`` is mocked where the code asks it questions, and the checks
look at devices, call order and arguments rather than at CUDA behaviour itself.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from fsam_dist.core import FSAM
from fsam_dist.shards.local import LocalBackend
from fsam_dist.train import checkpoint, distributed
from fsam_dist.train.loss import count_target_tokens, seq2seq_loss_sum
from fsam_dist.train.step import train_step

from .helpers import run_distributed, synthetic_batch, tiny_t5
from .launching import REPO

os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- checkpoints: FSAM state on the CPU ---------------------------------------------------------

def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def test_saved_fsam_state_is_on_cpu_and_loaded_with_map_location(tmp_path, monkeypatch):
    model = tiny_t5()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backend = LocalBackend(model, optimizer)
    fsam = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=5, interval=2, reuse_direction=True)
    for step in range(3):   # a refresh, a perturbed step (LookSAM keeps g_v), a plain step
        train_step(backend, seq2seq_loss_sum, [synthetic_batch(4, step)], step=step,
                   count_targets=count_target_tokens, fsam=fsam)
    state = fsam.state_dict()
    assert len(list(_tensors(state))) > 2, "the FSAM state holds mask and LookSAM tensors"
    # every tensor of a nested state is moved (to 'meta' here: the only other device a CPU has)
    moved = checkpoint.moved_to({"a": [torch.ones(2)], "b": (torch.zeros(1), 3)}, "meta")
    assert [t.device.type for t in _tensors(moved)] == ["meta", "meta"] and moved["b"][1] == 3

    routed = []
    real_moved = checkpoint.moved_to
    monkeypatch.setattr(checkpoint, "moved_to", lambda tree, device="cpu": (
        routed.append(device) if isinstance(tree, dict) and "mask_step" in tree else None) or real_moved(tree, device))
    path = checkpoint.save(tmp_path, 3, backend, fsam, {"step": 3, "world_size": 1, "backend": "single",
                                                       "config": {}}, 0, keep_last_n=2)
    saved = torch.load(path / "rank-0.pt", map_location="meta", weights_only=True)["fsam"]
    raw = torch.load(path / "rank-0.pt", weights_only=True)["fsam"]
    assert routed == ["cpu"], "the FSAM state goes through the move to the CPU before torch.save"
    assert len(list(_tensors(saved))) == len(list(_tensors(state)))
    assert all(t.device.type == "cpu" for t in _tensors(raw)), "every saved FSAM tensor is a CPU tensor"

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    fresh = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=5, interval=2, reuse_direction=True)
    checkpoint.load(path, backend, fresh, 0, 1, "single")
    assert routed[-1] == torch.device("cpu"), "loaded state goes to the device of this rank's parameters"
    rank_loads = [k for k in calls if k.get("weights_only") and "mmap" not in k]
    assert rank_loads and all(k.get("map_location") == "cpu" for k in rank_loads), calls
    assert fresh.state_dict()["mask_step"] == state["mask_step"]


# --- distributed.py: local rank, device, process group ------------------------------------------

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
               "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID",
               "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "SLURM_LOCALID")


@pytest.mark.parametrize("env,local", [
    ({"PMI_RANK": "5", "PMI_SIZE": "8", "SLURM_LOCALID": "1"}, 1),                 # srun --mpi=pmi2
    ({"PMIX_RANK": "3", "PMI_SIZE": "4", "SLURM_LOCALID": "3"}, 3),                # srun --mpi=pmix
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "2"}, 2),     # MVAPICH2
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "SLURM_LOCALID": "0"}, 1),                                                    # mpirun inside sbatch
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, 1),               # MPICH / Hydra
])
def test_local_rank_from_every_launcher(monkeypatch, env, local):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    found = distributed.detect_env()
    assert found.launcher == "mpi" and found.local_rank == local


def _fake_cuda(monkeypatch, count: int, log: list):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(("set_device", d)))


def test_local_rank_beyond_the_gpus_is_an_error_not_a_modulo(monkeypatch):
    log = []
    _fake_cuda(monkeypatch, 2, log)
    assert distributed.device_for(distributed.DistEnv(3, 4, 1, "torchrun")) == torch.device("cuda", 1)
    assert log == [("set_device", 1)]
    with pytest.raises(RuntimeError, match="local rank 2 but only 2 GPU"):
        distributed.device_for(distributed.DistEnv(2, 4, 2, "torchrun"))


def test_set_device_before_init_process_group_with_device_id(monkeypatch):
    log = []
    _fake_cuda(monkeypatch, 4, log)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: log.append(("init", a, k)))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **k: log.append(("new_group", k)) or "host")
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = distributed.init(distributed.DistEnv(3, 4, 3, "torchrun"), "auto", 10, use_deepspeed=False)
    try:
        assert device == torch.device("cuda", 3)
        assert log[0] == ("set_device", 3)
        assert log[1][0] == "init" and log[1][1][0] == "nccl" and log[1][2]["device_id"] == torch.device("cuda", 3)
        # checkpoint waits go through a gloo group with a long timeout, not the NCCL watchdog
        assert log[2] == ("new_group", {"backend": "gloo", "timeout": distributed.HOST_BARRIER_TIMEOUT})
        assert distributed._host_group == "host"
    finally:
        distributed._host_group = None


def _host_barrier_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    seen = []
    real = dist.monitored_barrier
    dist.monitored_barrier = lambda **k: seen.append(k) or real(**k)
    distributed.host_barrier()
    return {"timeout": seen[0]["timeout"].total_seconds(), "wait_all": seen[0]["wait_all_ranks"]}


def test_host_barrier_is_a_monitored_gloo_barrier_with_a_long_timeout():
    results = run_distributed(_host_barrier_rank, 2)
    assert all(r["timeout"] >= datetime.timedelta(hours=1).total_seconds() and r["wait_all"] for r in results)


# --- DeepSpeed: bf16 defaults, ZeRO-3 publish and LookSAM write-back, consolidation -------------

def test_bf16_deepspeed_json_accumulates_gradients_in_fp32(tmp_path):
    from fsam_dist.config import Config
    from fsam_dist.train.backends import deepspeed_config

    def cfg(ds: dict, precision: str):
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        return Config.model_validate({"model": {"name_or_path": "m"}, "data": {"train_file": "t"},
                                      "train": {"precision": precision},
                                      "backend": {"deepspeed_config": str(tmp_path / "ds.json")}})

    shipped = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    assert deepspeed_config(cfg(shipped, "bf16"), 2)["data_types"]["grad_accum_dtype"] == "fp32"
    assert "data_types" not in deepspeed_config(cfg(shipped, "fp32"), 2)
    explicit = {**shipped, "data_types": {"grad_accum_dtype": "bf16"}}
    assert deepspeed_config(cfg(explicit, "bf16"), 2)["data_types"]["grad_accum_dtype"] == "bf16"


def test_zero3_json_sizes_its_buckets_from_the_models_hidden_size():
    """The shipped ZeRO-3 JSON's "auto" buckets are filled as Hugging Face's Trainer fills them
    (DeepSpeed's default reduce bucket is 5e8 elements whatever the model: 2 GB fp32 per rank)."""
    from types import SimpleNamespace

    from fsam_dist.config import ConfigError
    from fsam_dist.train.backends import fill_hidden_sized

    shipped = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    zero = fill_hidden_sized(shipped, SimpleNamespace(hidden_size=1024), "zero3.json")["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 1024 ** 2, "stage3_prefetch_bucket_size": int(0.9 * 1024 ** 2),
                    "stage3_param_persistence_threshold": 10240}
    assert shipped["zero_optimization"]["reduce_bucket_size"] == "auto"   # the input is not changed
    explicit = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7}}
    assert fill_hidden_sized(explicit, SimpleNamespace(hidden_size=1024), "x.json") == explicit
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size.*hidden_size"):
        fill_hidden_sized(shipped, SimpleNamespace(), "zero3.json")


def test_zero3_publish_waits_for_the_current_stream_on_a_gpu(monkeypatch):
    from fsam_dist.shards.deepspeed_internals import zero3_publish

    log = []
    stream = types.SimpleNamespace(synchronize=lambda: log.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: log.append(("stream", device)) or stream)
    optimizer = types.SimpleNamespace(
        parameter_offload=types.SimpleNamespace(partition_all_parameters=lambda: log.append("release")),
        persistent_parameters=[])
    zero3_publish(optimizer, torch.device("cuda", 1))
    assert log == [("stream", torch.device("cuda", 1)), "synchronize", "release"]
    log.clear()
    zero3_publish(optimizer, torch.device("cpu"))
    assert log == ["release"]


def _zero3_bf16_perturbation(backend, world: int, rank: int) -> dict:
    from deepspeed.utils import safe_get_local_fp32_param

    from . import test_deepspeed as tds

    params = [p for _, p in backend.trainable]
    masters = lambda: [safe_get_local_fp32_param(p).detach().clone() for p in params]   # noqa: E731
    partitions = lambda: [p.ds_tensor.detach().clone() for p in params]                 # noqa: E731
    seen = []
    publish = backend.publish

    def recording(*args, **kwargs):
        publish(*args, **kwargs)
        seen.append((masters(), partitions()))

    backend.publish = recording
    fsam = FSAM(rho=0.05, keep_ratio=0.1, mask_interval=5)
    tds.train(backend, tds.Case("t5", 3), fsam, world, rank, steps=range(1))   # step 0 leaves w₀ trained
    seen.clear()
    before_m, before_p = masters(), partitions()
    tds.train(backend, tds.Case("t5", 3), fsam, world, rank, steps=range(1, 2))
    (pert_m, pert_p), (rest_m, rest_p) = seen
    return {
        "bf16": all(t.dtype == torch.bfloat16 for t in before_p),
        "start_rounded": all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(before_p, before_m)),
        "master_moved": sum(int((a != b).sum()) for a, b in zip(pert_m, before_m)),
        "partition_is_rounded_master": all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(pert_p, pert_m)),
        "master_restored": all(torch.equal(a, b) for a, b in zip(rest_m, before_m)),
        "partition_restored": all(torch.equal(a, b) for a, b in zip(rest_p, before_p)),
    }


def _zero3_checks(rank: int, world: int, checkpoint_dir: str) -> dict:
    """Both ZeRO-3 checks in one 2-rank run (one start-up): the bf16 perturbation on its own engine,
    then LookSAM with ``safe_get_local_grad`` handing out copies (``run_cases``, its own engine)."""
    import deepspeed.utils

    from . import test_deepspeed as tds

    tds.init_deepspeed()
    out = {"bf16": _zero3_bf16_perturbation(tds.ds_backend(tds.Case("t5", 3, config=tds.BF16), world), world, rank)}
    # bf16 (or any grad dtype other than fp32): safe_get_local_grad hands out a .float() copy.
    real = deepspeed.utils.safe_get_local_grad
    deepspeed.utils.safe_get_local_grad = lambda p: real(p).clone()
    try:
        out["looksam"] = tds.run_cases(rank, world, {"z3-looksam-copies": tds.Case("t5", 3, looksam=True)}, (),
                                       checkpoint_dir)
    finally:
        deepspeed.utils.safe_get_local_grad = real
    return out


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    return run_distributed(_zero3_checks, 2, str(tmp_path_factory.mktemp("zero3")), timeout=600)


def test_zero3_looksam_writes_the_corrected_gradient_back(zero3_runs):
    from . import test_deepspeed as tds

    results = [r["looksam"] for r in zero3_runs]
    weights = results[0]["z3-looksam-copies"]["weights"]
    assert all(t.device.type == "cpu" for t in weights.values()), "the consolidated state dict is on the CPU"
    tds.check_against_reference(results, "z3-looksam-copies", tds.Case("t5", 3, looksam=True), 2)


def test_zero3_bf16_perturbs_the_fp32_master_and_restores_exactly(zero3_runs):
    for r in (r["bf16"] for r in zero3_runs):
        assert r["bf16"] and r["start_rounded"]
        assert r["master_moved"] > 0, "the perturbation reaches the fp32 master"
        assert r["partition_is_rounded_master"], "the forward reads bf16(w + e) from the master"
        assert r["master_restored"] and r["partition_restored"]


def _broadcast_rank(rank: int, world: int) -> dict:
    from fsam_dist.train.evaluate import broadcast_module

    torch.manual_seed(rank)   # every rank starts from other weights
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    module[1].register_buffer("counter", torch.full((2,), float(rank)))
    broadcast_module(module)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_evaluation_broadcasts_rank0_weights_tensor_by_tensor():
    results = run_distributed(_broadcast_rank, 2)
    torch.manual_seed(0)
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    assert torch.equal(results[1]["1.counter"], torch.zeros(2))


# --- bench/gpu_check.py and bench/host_syncs.py on the CPU --------------------------------------

def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs a GPU" in lines[0]


def test_gpu_check_cpu_quick_mode_runs_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    failed = {name: s for name, s in report["sections"].items() if s["status"] == "fail"}
    assert not failed, failed
    ran = {name for name, s in report["sections"].items() if s["status"] == "ok"}
    assert {"core_parity", "topk_mask", "bf16_steps", "step_time", "host_syncs"} <= ran, report["sections"]


def test_host_sync_count_does_not_grow_with_views_or_chunks_outside_the_core():
    from bench.host_syncs import count_step_syncs

    few = count_step_syncs(views=2, chunks_per_view=1, micro_batches=2)
    many = count_step_syncs(views=5, chunks_per_view=2, micro_batches=2)
    assert many["total"] > few["total"] > 0   # the counter sees the core's per-view/per-chunk calls
    for where in ("comm", "train", "shards"):
        assert few.get(where, 0) == many.get(where, 0), (where, few, many)


# --- launch/slurm/node.sh: the DeepSpeed runner uses the GPUs SLURM allocated -----------------

def test_node_sh_passes_slurms_gpus_to_the_deepspeed_runner(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile, parse_args, parse_inclusion_exclusion

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nif [ \"$2\" = hostnames ]; then printf 'n1\\nn2\\n'; "
                                      "else echo 'NodeName=n1 NodeAddr=10.0.0.1 State=IDLE'; fi\n")
    (bin_dir / "fakepython").write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "BACKEND": "deepspeed", "DS_LAUNCHER": "deepspeed",
           "FSAM_REPO": str(REPO), "PYTHON": str(bin_dir / "fakepython"), "OUTPUT_DIR": str(tmp_path),
           "MASTER_ADDR": "10.0.0.1", "RDZV_PORT": "29500", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0",
           "SLURMD_NODENAME": "n1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "2,3", "SLURM_CPUS_ON_NODE": "8"}
    subprocess.run(["bash", str(REPO / "launch" / "slurm" / "node.sh"), "cfg.yaml"], env=env, check=True,
                   capture_output=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["-m", "deepspeed.launcher.runner"]
    args = parse_args(argv[2:])
    assert args.num_gpus < 0 and args.num_nodes < 0, "--num_gpus would mean devices 0..N-1"
    resources = parse_inclusion_exclusion(fetch_hostfile(args.hostfile), args.include, args.exclude)
    assert dict(resources) == {"n1": [2, 3], "n2": [2, 3]}
