"""DistributedDataParallel on CPU: a compiled routec model trains under DDP like one process on the whole batch.

Two processes (`torch.multiprocessing`, gloo, a free port on 127.0.0.1) each load the same weights, run one
training step (forward in train mode, loss, backward, an SGD step) on their half of a batch, and write
their gradients and updated weights; the test checks that DDP's averaged gradients and the updated weights
equal a single-process step on the whole batch (float64). The models are deterministic in training: the
early-exit ViT (every exit's loss counts), the leaky-RNN + LSTM classifier (fused scans and a step loop)
and `moe.route` with its gate noise switched off (top-k routing per token; the load-balance loss is left
out of the loss because it is not a mean over samples). `paths.route` samples paths and gumbel noise in
training, so it is left out.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).parent.parent
WORLD = 2
BATCH = 4  # split into two shards of 2: the mean loss of each shard averages to the whole batch's

# example file and its (small) model parameters; 3 classes each
MODELS = {
    "early_exit": ("examples/early_exit.route", {"d": 16, "depth": 2, "heads": 2, "classes": 3}),
    "leaky_rnn": ("examples/leaky_rnn.route", {"n_in": 4, "n": 8, "classes": 3}),
    # moe.route with its gate noise switched off: top-k routing is then per token and deterministic
    "moe": ("examples/moe.route", {"d": 8, "depth": 1, "vocab": 3}),
}


def make_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    if name == "moe":  # token ids in, next-token-style labels per token
        return torch.randint(0, 3, (BATCH, 5), generator=g), torch.randint(0, 3, (BATCH, 5), generator=g)
    x = torch.randn(BATCH, 3, 32, 32, generator=g) if name == "early_exit" else torch.randn(BATCH, 5, 4, generator=g)
    y = torch.randint(0, 3, (BATCH,), generator=g)
    return x.double(), y


def build(name: str) -> torch.nn.Module:
    from routec.compiler import compile_source

    path, params = MODELS[name]
    text = (ROOT / path).read_text()
    if name == "moe":
        assert "noisy=true" in text
        text = text.replace("noisy=true", "noisy=false")
    return compile_source(text, str(ROOT / path), **params).double().train()


def step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD step on the cross-entropy of the output (and of every exit); returns the gradients (before the
    step), the updated parameters and the loss."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.zero_grad()
    out = net(x)
    if isinstance(out, tuple):  # the final output and every exit's logits (the MoE's aux_loss is left out:
        logits = [out.out] + list(getattr(out, "exits", ()))  # it is not a mean over samples)
    else:
        logits = [out]
    loss = sum(F.cross_entropy(z.flatten(0, -2), y.flatten()) for z in logits)
    loss.backward()
    module = net.module if hasattr(net, "module") else net
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in module.named_parameters()}
    opt.step()
    params = {f"param.{k}": p.detach().clone() for k, p in module.named_parameters()}
    return {**grads, **params, "loss": loss.detach()}


def _worker(rank: int, port: int, workdir: str) -> None:
    """One DDP rank: the shared initial weights, its shard of each batch, one step per model."""
    os.environ["ROUTEC_BACKEND"] = "reference"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name in MODELS:
            net = build(name)
            net.load_state_dict(torch.load(Path(workdir) / f"{name}.init.pt"))
            ddp = DDP(net)
            x, y = make_batch(name)
            shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            result = step(ddp, x[shard], y[shard])
            torch.save(result, Path(workdir) / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_step_equals_single_process_step(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEC_BACKEND", "reference")
    reference = {}
    for name in MODELS:
        torch.manual_seed(0)
        net = build(name)
        torch.save(net.state_dict(), tmp_path / f"{name}.init.pt")
        x, y = make_batch(name)
        reference[name] = step(net, x, y)

    # The spawned ranks import this file as the module `test_ddp` (tests/ on their sys.path).
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import importlib

    worker = importlib.import_module("test_ddp")._worker
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    for name in MODELS:
        ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt") for r in range(WORLD)]
        want = reference[name]
        grads = [k for k in want if k.startswith("grad.")]
        assert len(grads) > 4
        for key in want:
            if key == "loss":  # each rank's loss is its shard's; their mean is the whole batch's
                torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, want[key])
                continue
            for r in range(WORLD):
                torch.testing.assert_close(ranks[r][key], want[key], rtol=1e-9, atol=1e-12,
                                           msg=lambda m, key=key, r=r: f"{name} rank {r} {key}: {m}")
        # the shards really differ: without the all-reduce the ranks' gradients would not agree
        assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])
