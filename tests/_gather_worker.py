"""A process of the two-process gather test (tests/test_train.py), run by torch.multiprocessing."""

import torch
import torch.distributed as dist

from model_code.model.loss import gather_with_grad, info_nce


def run(rank: int, world: int, out: str) -> None:
    # a file store: no port to race for
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        q_all = torch.nn.functional.normalize(torch.randn(world * 4, 8, generator=g), dim=-1)
        c_all = torch.nn.functional.normalize(torch.randn(world * 4, 8, generator=g), dim=-1)
        q = q_all[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        c = c_all[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        gathered, counts = gather_with_grad(q)
        loss, acc = info_nce(q, c, 4, 0.1)
        loss.backward()
        torch.save({"gathered": gathered.detach(), "loss": loss.detach(), "q_grad": q.grad, "c_grad": c.grad},
                   f"{out}/rank{rank}.pt")
        dist.barrier()  # nobody tears down while the other still communicates
    finally:
        dist.destroy_process_group()
