"""Which shards a stream reads: the give-up rule for data that cannot be read at all
(`ShardHealth`) and the memory of remote shards given up, passed over for a growing
back-off (`ShardMemory`). Stages of `phoclip.data.stream.ShardStream`."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable, Iterator, Optional

logger = logging.getLogger(__name__)


class NoReadableSamples(ValueError):
    """A stream opened many shards in a row and could read no sample from any of them."""


class ShardHealth:
    """The stream's give-up rule: stop when `give_up` shards in a row turned out wholly
    unreadable, not spin for ever on missing or corrupt data.

    A shard counts as unreadable once it is *settled*: read to its end (the next shard
    was opened) and every sample it gave was decoded, none of them successfully (a shard
    that gave no sample at all settles when the next one is opened). Any sample decoded
    successfully resets the count. Counting settled shards, not shards opened, keeps the
    rule independent of the shuffle buffer and the shard size: filling a large buffer
    opens many shards before any sample is decoded, and those are not unreadable."""

    def __init__(self, give_up: int, skips: Counter) -> None:
        self.give_up, self.skips = give_up, skips
        self.opened = 0  # shards opened so far: what a new layout must not reread
        self.unreadable = 0  # settled unreadable shards since the last good sample
        self._pending: dict[int, list] = {}  # shard -> [samples given, decoded, good, read to its end, url]

    def track_shards(self, shards: Iterable[dict]) -> Iterator[dict]:
        """Pass shards through, numbering them; opening one ends the previous one's read."""
        for sh in shards:
            if self.opened:
                self._ended(self.opened - 1)
            self._pending[self.opened] = [0, 0, 0, False, sh["url"]]
            self.opened += 1
            yield sh
        if self.opened:
            self._ended(self.opened - 1)

    def track_samples(self, samples: Iterable[dict]) -> Iterator[dict]:
        """Tag each sample with the shard it came from (the one opened last)."""
        for s in samples:
            shard = self.opened - 1
            self._pending[shard][0] += 1
            s["__shard__"] = shard
            yield s

    def decoded(self, sample: dict, ok: bool) -> None:
        """Record one sample's outcome (resume replays count as good)."""
        shard = sample.get("__shard__")
        st = self._pending.get(shard)
        if st is None:
            return
        st[1] += 1
        if ok:
            st[2] += 1
            self.unreadable = 0
        self._settle(shard)

    def _ended(self, shard: int) -> None:
        st = self._pending.get(shard)
        if st is not None:
            st[3] = True
            self._settle(shard)

    def _settle(self, shard: int) -> None:
        given, decoded, good, ended, url = self._pending[shard]
        if not ended or decoded < given:
            return
        del self._pending[shard]
        if good:
            return
        self.unreadable += 1
        if self.unreadable >= self.give_up:
            raise NoReadableSamples(
                f"no sample could be read from the last {self.unreadable} shards this stream "
                f"settled (e.g. {url}; skipped so far: {dict(self.skips)}); check data.train_shards")


class ShardMemory:
    """The remote shards this stream gave up (too slow, failing after its retries, or
    missing), so that a shard server that trickles costs the run its retries once per
    back-off rather than once per epoch: a shard given up for the k-th time is passed over
    (counted as `passed_over_shard`) for the stream's next 2^k x len(urls) shard choices
    (at most 64 x), then read again. In epoch order one stream's next epoch is always
    inside the first back-off.

    The decisions depend only on the stream's own give-up events `[choice, url, samples
    given]`, carried in its batches and so in checkpoints (`StreamTracker.given_up`): a
    resumed stream replays them without reading those shards again (a shard given up
    after m samples is read to m only), so it continues exactly, and cheaply. A stream of
    a new layout starts with the old streams' shards passed over (`StreamLayout.given_up`)."""

    MAX_DOUBLINGS = 6

    def __init__(self, n_urls: int, skips: Counter, events: Iterable = (), seeded: Optional[dict] = None,
                 counted_before: int = 0) -> None:
        self.n, self.skips, self.counted_before = max(1, n_urls), skips, counted_before
        self.events: list[list] = []
        self.replay = {int(e[0]): (str(e[1]), int(e[2])) for e in events}
        self.times: Counter = Counter()
        self.until: dict[str, int] = {}  # url -> the last shard choice that passes it over
        for url, k in (seeded or {}).items():
            self.times[url] = int(k)
            self.until[url] = self.span(int(k)) - 1

    def span(self, k: int) -> int:
        """Shard choices passed over after the k-th give-up."""
        return self.n * 2 ** min(max(k, 1), self.MAX_DOUBLINGS)

    def state(self) -> list:
        """The give-up events so far (a copy: the batch that carries them outlives this)."""
        return [list(e) for e in self.events]

    def choose(self, shards: Iterable[dict], health: "ShardHealth") -> Iterator[dict]:
        """Pass the numbered shards (`ShardHealth.track_shards`) on, less those in their
        back-off; replayed give-ups are remembered without a read."""
        for sh in shards:
            i, url = health.opened - 1, sh["url"]
            if self.until.get(url, -1) >= i:
                if i >= self.counted_before:  # a resumed stream's replay was counted before its checkpoint
                    self.skips["passed_over_shard"] += 1
                continue
            if self.until.pop(url, None) is not None:
                logger.info("reading %s again after its back-off (given up %d times)", url, self.times[url])
            sh["choice"] = i
            if self.replay.get(i, ("",))[0] == url:
                given = self.replay[i][1]
                self._remember(i, url, given, replayed=True)
                if not given:
                    continue
                sh["max_samples"] = given
            yield sh

    def gave_up(self, sh: dict, given: int) -> None:
        """`read_shards` gave the shard up after `given` samples."""
        if "choice" in sh and "max_samples" not in sh:
            self._remember(sh["choice"], sh["url"], given)

    def _remember(self, choice: int, url: str, given: int, replayed: bool = False) -> None:
        self.times[url] += 1
        span = self.span(self.times[url])
        self.until[url] = choice + span
        self.events.append([choice, url, given])
        (logger.info if replayed else logger.warning)(
            "shard %s given up (%d time(s) in this stream%s): passed over for its next %d shard choices, "
            "counted as passed_over_shard", url, self.times[url], ", remembered from the checkpoint" if replayed else "",
            span)
