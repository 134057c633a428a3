"""Two real processes (gloo on CPU): every rank holds bit-identical parameters after every re-init under
DDP, and a sharded head (FSDP2) is refused at start instead of diverging silently."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import timm
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rifle_hf import RifleConfig, RifleScheduler, split_head_param_groups

    _init(rank, world, port)
    try:
        torch.manual_seed(0)  # same init on every rank, as DDP broadcasts anyway
        model = DDP(timm.create_model("test_resnet", num_classes=3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        split_head_param_groups(opt, model)
        # no seed given: every rank must still draw the same values (derived from seed 0 + index)
        sched = RifleScheduler(model, RifleConfig(num_reinits=3), total=8, unit="step", optimizer=opt)
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        mismatches = []
        for step in range(1, 9):
            x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sched.step_update(step):
                for p in model.parameters():
                    gathered = [torch.empty_like(p) for _ in range(world)]
                    dist.all_gather(gathered, p.detach().contiguous())
                    mismatches += [step for t in gathered[1:] if not torch.equal(t, gathered[0])]
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"flat": flat, "mismatches": mismatches, "fired": [e.step for e in sched.history]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_bitwise_equal_after_every_reinit(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["fired"] == r1["fired"] == [2, 4, 6]
    assert r0["mismatches"] == [] and r1["mismatches"] == []
    assert torch.equal(r0["flat"], r1["flat"])


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import timm
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rifle_hf import RifleConfig, RifleScheduler

    _init(rank, world, port)
    try:
        model = timm.create_model("test_resnet", num_classes=4)
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        try:
            RifleScheduler(model, RifleConfig(num_reinits=1, head_lr="none"), total=4, unit="step")
            message = ""
        except ValueError as err:
            message = str(err)
        with open(f"{out}/fsdp{rank}.txt", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_fsdp_sharded_head_is_refused_at_start(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"fsdp{rank}.txt").read_text()
        assert "sharded" in message and "DDP" in message
