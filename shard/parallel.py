"""Tensor-parallel context: which rank this process is and how ranks combine results."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shard.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class Parallel:
    """Rank `rank` of `world_size`; with world_size 1 every collective is a no-op."""

    rank: int = 0
    world_size: int = 1

    def split(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) of a dimension of `size` split evenly across ranks."""
        per_rank = size // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=-1)


def resolve_device(name: str, local_rank: int) -> str:
    """'auto' -> this rank's GPU (cuda:local_rank modulo the GPUs) when CUDA is there, else
    'cpu'; a plain 'cuda' with several ranks also means one GPU per rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    return name


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: str,
    timeout_s: float,
) -> None:
    """Joins the torch.distributed group (gloo on CPU, NCCL on CUDA, this rank's GPU made
    current first). A rank that does not arrive within `timeout_s` makes every other rank
    fail with a clear error, not hang."""
    from datetime import timedelta

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    if world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except Exception as exc:  # noqa: BLE001 - any rendezvous failure ends start-up
        raise ModelLoadError(
            f"rank {rank} could not join the {world_size}-rank {backend} group at "
            f"{master_addr}:{master_port} within {timeout_s:.0f} s: {exc}"
        ) from exc


URL_BYTES = 512  # longest advertised URL, UTF-8 encoded


def gather_urls(own_url: str, world_size: int) -> list[str]:
    """Every rank's advertised URL, in rank order (rank 0 answers ServiceDiscovery with it).
    Exchanged as fixed-size byte tensors, never pickled objects: a peer can send only bytes."""
    if world_size == 1:
        return [own_url]
    encoded = own_url.encode()
    if len(encoded) > URL_BYTES:
        raise ModelLoadError(f"shard URL longer than {URL_BYTES} bytes: {own_url[:80]}...")
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )
    mine = torch.zeros(URL_BYTES, dtype=torch.uint8, device=device)
    mine[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine)
    return [decode_url(part.cpu()) for part in parts]


def decode_url(part: torch.Tensor) -> str:
    """A zero-padded UTF-8 byte tensor back to text; anything else is a clear error."""
    raw = bytes(part.tolist()).rstrip(b"\0")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ModelLoadError("a rank sent a shard URL that is not UTF-8") from exc
