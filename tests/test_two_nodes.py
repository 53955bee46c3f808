"""Two machines, played by two torchrun agents on this one: each agent is a "node" with one
process, and they meet through a c10d rendezvous on 127.0.0.1, as two machines would at
``--rdzv-endpoint HOST:PORT``. On the parquet layout the two ranks read disjoint rows, and the
weights after a few SFT steps equal one process's on the combined batch."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env
from test_training import DDP_SCRIPT, step_losses, tiny_lm_dir  # noqa: F401 (tiny_lm_dir: a fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_read_disjoint_rows_and_equal_one_process(tiny_lm_dir, tiny_clip_dir, tmp_path):  # noqa: F811
    env = subprocess_env()
    world = tmp_path / "world"
    subprocess.run([sys.executable, "-m", "minimind_v.data.shapes", "--out", world, "--seed", "0",
                    "--n-pretrain", "8", "--n-sft", "16", "--n-eval", "4", "--n-eval-images", "2",
                    "--image-size", "96", "--workers", "1", "--format", "parquet", "--no-progress"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    assert (world / "sft_i2t.parquet").exists() and not (world / "sft_data.json").exists()
    script = tmp_path / "record_sft.py"
    script.write_text(DDP_SCRIPT)
    common = ["--data", world, "--init", tiny_lm_dir, "--vision", tiny_clip_dir, "--steps", "2",
              "--lr", "1e-2", "--warmup-steps", "1", "--weight-decay", "0", "--grad-clip", "0", "--log-every", "1"]
    (tmp_path / "nodes").mkdir()
    (tmp_path / "one").mkdir()

    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes-test",
                                script, tmp_path / "nodes", *common, "--batch-size", "4",
                                "--out", tmp_path / "nodes" / "out"],
                               cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
              for node in (0, 1)]
    try:
        logs = [agent.communicate(timeout=240)[0] for agent in agents]
    finally:
        for agent in agents:  # a failed rendezvous must not leave an agent waiting
            if agent.poll() is None:
                agent.kill()
    for node, (agent, log) in enumerate(zip(agents, logs)):
        assert agent.returncode == 0, f"node {node}:\n{log[-4000:]}"
    one = subprocess.run([sys.executable, script, tmp_path / "one", *common, "--batch-size", "8",
                          "--out", tmp_path / "one" / "out"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0, one.stderr[-4000:]

    single = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "nodes" / f"rank{r}.pt") for r in range(2)]
    assert len(single["micro"]) == 2 and all(len(r["micro"]) == 2 for r in ranks)
    for step in range(2):
        first, second = ranks[0]["micro"][step][2], ranks[1]["micro"][step][2]
        assert len(first) == len(second) == 4 and not set(first) & set(second)  # disjoint rows
        assert first + second == single["micro"][step][2]  # together: the one process's batch
    assert step_losses(tmp_path / "nodes" / "out")[1] == pytest.approx(step_losses(tmp_path / "one" / "out")[1],
                                                                       abs=2e-5)
    for g0, g1 in zip(ranks[0]["grads"], ranks[1]["grads"]):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # the nodes hold the same gradients
    # The weights after two steps, within 1% of one step (lr) as in the two-process test.
    a = load_file(tmp_path / "nodes" / "out" / "model.safetensors")
    b = load_file(tmp_path / "one" / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-2 * 1e-2, msg=lambda m: f"{name}: {m}")
