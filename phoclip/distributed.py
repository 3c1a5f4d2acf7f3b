"""What a process knows of its place in a job (rank, world size, device), as plain data:
the launch layer reads the launcher's environment (launch/phoclip_cli/distributed.py) and
passes this in; library and training code never read RANK themselves."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0
