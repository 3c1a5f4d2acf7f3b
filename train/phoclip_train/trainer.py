"""The training loop. The run's parts come built (`phoclip_train.run.build_run`), the
step's math is plain functions (`phoclip_train.step`); the Trainer only loops: train(),
train_step(), should_continue(). Each part owns its cadence (`metrics.due`,
`evaluator.due`, `checkpointer.due`) and its state."""
from __future__ import annotations

import logging
import time

from phoclip_train.build import close_loader
from phoclip_train.learning import LearningCheck
from phoclip_train.run import Run
from phoclip_train.signals import STUCK_WAIT_S, StoppedWaitingForData, StopSignal  # noqa: F401 (re-exported)
from phoclip_train.step import StepOutput, device_inputs, read_step, train_step

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """train.max_nonfinite consecutive steps were non-finite; the run saved and stopped."""


class Trainer:
    """Loops over a built `Run`: `Trainer(build_run(cfg, dist))`."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.stop_signal = StopSignal(STUCK_WAIT_S, self.run.checkpointer.latest)
        self.stop_requested = False  # every rank's agreed answer, read on a sync step
        self.learning = LearningCheck()  # said at the end: a loss that has not moved, recall at chance

    # the parts, by their usual names (tests and benchmarks drive single steps)
    cfg = property(lambda self: self.run.cfg)
    dist = property(lambda self: self.run.dist)
    model = property(lambda self: self.run.model)
    engine = property(lambda self: self.run.engine)
    loss_fn = property(lambda self: self.run.loss_fn)
    stream = property(lambda self: self.run.stream)
    tokenizer = property(lambda self: self.run.data.tokenizer)
    channels_last = property(lambda self: self.run.settings.channels_last)
    step = property(lambda self: self.run.progress.step)

    # ------------------------------------------------------------------ the loop
    def should_continue(self) -> bool:
        return self.run.progress.step < self.cfg.train.max_steps and not self.stop_requested

    def train(self) -> dict:
        """Loop until train.max_steps (or a stop signal); evaluate, save and export.
        Returns the newest figures read (and the last evaluation's)."""
        with self.stop_signal.installed():
            return self._loop()

    def _loop(self) -> dict:
        r, t = self.run, self.cfg.train
        accum_steps = r.settings.accum_steps
        it = iter(r.loader())
        last: dict = {}
        r.metrics.start(r.progress.step)
        try:
            while self.should_continue():
                t0 = time.time()
                with self.stop_signal.waiting():
                    batches = [next(it) for _ in range(accum_steps)]
                wait = time.time() - t0
                for b in batches:
                    r.position.update(b)
                metrics = self.train_step(batches, sync=self.is_sync_step(r.progress.step + 1))
                step = r.progress.step = r.progress.step + 1
                n = sum(b["images"].shape[0] for b in batches) * self.dist.world_size
                r.progress.samples_seen += n
                r.metrics.count(n, wait)
                if r.metrics.due(step):
                    metrics = r.metrics.log_train(step, metrics, self._run_figures())
                    r.lock.refresh()
                if metrics:  # read on this step (see is_sync_step)
                    last = metrics
                    self.learning.saw(step, metrics)
                if r.nonfinite.streak >= t.max_nonfinite:
                    self.save()
                    raise NonFiniteError(
                        f"{r.nonfinite.streak} consecutive non-finite steps (last at step {step}); the weights "
                        f"are those from before the fault, saved in {r.checkpointer.latest()}. Look for bad "
                        "data, lower the learning rates, set train.grad_clip=1.0, or switch fp16 to "
                        "train.precision=bf16")
                if r.evaluator.due(step):  # the end: before its save
                    last.update(r.evaluator.run(step))
                if self.stop_requested:
                    self.save()
                    logger.warning("stopped by signal at step %d; resume with --resume latest", step)
                    return last
                if r.checkpointer.due(step):
                    self.save()
            if r.evaluator.enabled and r.evaluator.last_step != r.progress.step:  # resumed at max_steps
                last.update(r.evaluator.run(r.progress.step))
            self.save()
            r.export()
            self.learning.report(r.evaluator.last_val)
            return last
        finally:
            close_loader(it)

    def _run_figures(self) -> dict:
        r = self.run
        skipped = r.position.tracker.total_skipped()
        given_up = r.position.tracker.given_up_shards()  # remote shards in their back-off, by name
        return {"epoch": r.progress.samples_seen / max(1, r.data.dataset_size),
                "skipped_samples": sum(skipped.values()), "skipped": skipped,
                "nonfinite_steps": r.nonfinite.total, **({"given_up_shards": given_up} if given_up else {})}

    def is_sync_step(self, step: int) -> bool:
        """Steps on which the host reads the device-side flags and metrics: the same on
        every rank (they agree on stopping there); every step where the engine needs the
        skip decision on the host anyway."""
        r = self.run
        return (not r.engine.skips_on_device or step % r.settings.sync_every == 0 or r.metrics.due(step)
                or r.checkpointer.due(step) or r.evaluator.due(step) or step >= self.cfg.train.max_steps)

    def device_inputs(self, batches: list[dict]) -> list[tuple]:
        """Batches → device inputs (see `phoclip_train.step.device_inputs`)."""
        return device_inputs(batches, self.run.prep, self.model)

    def train_step(self, batches: list[dict], sync: bool = True) -> dict:
        """One optimizer step over `accum_steps` micro-batches. With `sync` the host reads
        the step's figures (returned as floats) and the agreed stop request
        (`stop_requested`); without, the step issues no host sync and returns {}."""
        r = self.run
        out: StepOutput = train_step(self.model, r.engine, r.loss_fn, self.device_inputs(batches))
        r.nonfinite.update(out.bad)
        if not sync:
            return {}
        metrics, self.stop_requested = read_step(out, r.nonfinite, self.stop_signal.requested, r.engine.lrs())
        return metrics

    # ------------------------------------------------------------------ eval / export
    def save(self) -> None:
        """Checkpoint this step (collective; once per step and evaluation)."""
        self.run.checkpointer.save(id(self.run.evaluator.last_val))

    def close(self) -> None:
        self.run.close()
