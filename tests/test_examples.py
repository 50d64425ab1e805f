"""The custom-loop examples run as their headers say, for a few steps, on 2 CPU processes."""

from __future__ import annotations

import re

import pytest

from .helpers import free_port, unavailable
from .launching import BIN, REPO, check, launch

COMMANDS = {
    "ddp": "torchrun --nproc_per_node 2 examples/custom_loop_ddp.py",
    "fsdp2": "torchrun --nproc_per_node 2 examples/custom_loop_fsdp2.py",
    "deepspeed": "deepspeed --num_gpus 2 examples/custom_loop_deepspeed.py --stage 3",
    "causal_lm": "torchrun --nproc_per_node 2 examples/causal_lm.py --fsdp2",
}
"""Launch commands as written in each example's header (checked below)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_example_runs_as_its_header_says(name):
    command = COMMANDS[name]
    if name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            unavailable("DeepSpeed is not installed (pip install 'fsam-dist[deepspeed]')")
    script = next(word for word in command.split() if word.startswith("examples/"))
    assert command in (REPO / script).read_text(), f"{script}'s header does not show `{command}`"
    launcher, *rest = command.split()
    # a free port: other runs may hold the default 29500
    rest = (["--standalone"] if launcher == "torchrun" else ["--master_port", str(free_port())]) + rest
    out = check(launch([str(BIN / launcher), *rest, "--steps", "3"], timeout=300, env={"PYTHONPATH": str(REPO)}))
    steps = [int(s) for s in re.findall(r"step (\d+): loss [0-9.]+", out.stdout)]
    assert steps == [1, 2, 3], out.stdout[-2000:]
