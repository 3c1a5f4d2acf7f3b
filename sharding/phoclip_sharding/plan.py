"""Phase 2 of a make_shards job: the deterministic shard plan (each split in the seeded
order of its samples' hashes, cut every --shard-size samples), its fingerprint, and the
refusal to write one job's shards into a folder holding another's."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from phoclip.data.manifest import SPLITS
from phoclip.errors import SetupError
from phoclip_sharding.output import Output
from phoclip_sharding.store import JobStore
from phoclip_sharding.writer import ShardTask, TextSettings


@dataclass
class ShardPlan:
    """What every shard of the job holds and how it is made. `refresh` is called about
    once per shard planned (the job lock's heartbeat: a live job never looks stale)."""

    store: JobStore
    out: Path
    url: Optional[str]
    shard_size: int
    image_size: int
    jpeg_quality: int
    max_pixels: int
    max_image_bytes: int
    text: TextSettings
    refresh: Callable[[], None] = lambda: None

    def tasks(self) -> Iterator[ShardTask]:
        """The shards in order, a shard at a time (the store streams them)."""
        for split in SPLITS:
            for idx, rows in enumerate(self.store.shard_rows(split, self.shard_size)):
                self.refresh()
                items = [(sha[:24], path, meta, caps) for sha, path, meta, caps in rows]
                yield ShardTask(split, idx, str(self.out), self.image_size, self.jpeg_quality, items,
                                self.max_pixels, self.max_image_bytes, self.text, remote=self.url)

    def survey(self, output: Output, settings: list) -> tuple[list[str], int, str]:
        """(every shard name, samples still to write, the plan's hash). The hash covers
        each shard's samples and `settings` (whatever changes a shard's bytes)."""
        plan = hashlib.sha256()
        names, todo = [], 0
        for t in self.tasks():
            names.append(t.name)
            todo += 0 if output.is_complete(t.name) else len(t.samples)
            plan.update(json.dumps([t.name, [(k, p, caps) for k, p, _, caps in t.samples]]).encode())
        plan.update(json.dumps(settings).encode())
        return names, todo, plan.hexdigest()[:16]


def claim_output(output: Output, plan_hash: str) -> None:
    """Record the plan in the output, refusing one that holds another job's shards (a
    resumed job must have the same inputs and settings): a SetupError."""
    old_plan = output.read_text(".plan")
    if old_plan is not None and old_plan.strip() != plan_hash:
        raise SetupError(f"{output} holds shards of a different job (inputs or settings changed). "
                         "Use a new --out folder, or delete the old one.")
    output.write_text(".plan", plan_hash)
