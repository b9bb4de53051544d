"""THE training recipe: data -> model -> backend, then the step loop with eval, metrics and checkpoints, then
the final eval, export and sample.

Everything memory-related happens in `engine/model.py` (module graph) and `engine/backends/` (precision, ZeRO,
optimizer); this file only sequences a run. `TrainingRecipe` is set up one job at a time (`setup_data`,
`setup_backend`, `resume`), trains (`train`: the loop, one screen) and finishes (`finish`); what the loop writes
(metrics.jsonl, TensorBoard, the progress bar, the memory tracker) is one `RunLog`, released on any exit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.artifacts import export_checkpoint
from engine.backends import make_backend
from engine.backends.base import Backend, StepStats
from engine.backends.deepspeed_backend import (
    load_user_ds_json,
    make_ds_config,
)
from engine.checkpoint import (
    checkpoint_name,
    checkpoints_dir,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from engine.classification import load_classification_splits
from engine.config import RunConfig, config_to_yaml
from engine.data import Sampler, StepSampler, eval_batches, load_splits
from engine.devices import keep_freed_host_memory, pick_device, resolve_precision, return_freed_host_memory
from engine.distributed import DistEnv, dist_env
from engine.early_stopping import EarlyStopping
from engine.errors import EngineError
from engine.generate import sample_text
from engine.guards import BadStepGuard, StopSignal
from engine.memory.meter import MemoryMeter
from engine.memory.tracker import CUDA_BLOCK, MemoryTracker
from engine.metrics import eval_line, evaluate_classifier, lm_metrics, rank_share
from engine.model import build_model, compile_blocks, compile_seconds, parameter_counts
from engine.preflight import preflight
from engine.report import open_tensorboard, plot_run
from engine.resume import ResumePlan, plan_resume, run_layout
from engine.run_dir import (
    CONFIG,
    METRICS,
    PLOTS_DIR,
    RUN_MARKER,
    SUMMARY,
    check_output_dir,
    clear_run,
    truncate_metrics,
)
from engine.streaming import StreamSampler, streamed_splits
from engine.tokenizer import load_tokenizer


class RunPruned(Exception):
    """The caller's `on_eval` (e.g. a sweep's pruner) ended the run at a periodic eval; every rank raises it."""

    def __init__(self, step: int):
        super().__init__(f"run pruned at step {step}")
        self.step = step


def say(env: DistEnv, *msg) -> None:
    if env.is_main:
        print(*msg, flush=True)


@dataclass
class TrainState:
    """Where a run is: what a checkpoint's trainer_state.json holds besides the layout and the guards."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    last_checkpoint: Path | None = None
    last_good: Path | None = None  # saved before the current run of non-finite steps began

    def state_dict(self, data: dict) -> dict:
        """`data`: the sampler's position (`Sampler.state_dict`)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val, "data": data,
                "epoch": data["epoch"]}

    def load_state_dict(self, st: dict, path: Path) -> None:
        self.step, self.tokens_seen, self.best_val = st["step"], st["tokens_seen"], st.get("best_val", math.inf)
        self.last_checkpoint = self.last_good = path


def kept_checkpoints(best: str | None, steps_failing: bool, last_good: Path | None) -> set[str]:
    """Checkpoints retention must not prune beside the newest keep_last: the best one (checkpoint.keep_best), and
    while steps are failing, the last one saved before the trouble began."""
    keep = {best} if best else set()
    if steps_failing and last_good is not None:
        keep.add(last_good.name)
    return keep


class RunLog:
    """What a run writes while it trains, opened together and released together on any exit (one ExitStack):
    metrics.jsonl and TensorBoard (rank 0), and for the loop the progress bar and the memory tracker (a dispatch
    mode plus optimizer hooks, which must never outlive the run)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, out: Path, total_steps: int):
        self.cfg, self.env, self.out, self.total_steps = cfg, env, out, total_steps
        self.metrics = self.tb = self.pbar = self.tracker = None
        self._stack = contextlib.ExitStack()
        self._loop = contextlib.ExitStack()  # closed when the loop ends (or with the run)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self._loop.close()
        self._stack.close()

    def open(self, start_step: int, resumed: bool, backend: Backend) -> None:
        cfg, main = self.cfg, self.env.is_main
        if main:
            self.metrics = self._stack.enter_context(open(self.out / METRICS, "a", encoding="utf-8"))
        self.tb = open_tensorboard(cfg.logging.tensorboard and main, self.out, start_step + 1 if resumed else None)
        if self.tb:
            self._stack.callback(self.tb.close)
        if main and cfg.logging.progress:
            self.pbar = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr)
            self._loop.callback(self.pbar.close)
        if cfg.logging.track_memory:
            self.tracker = MemoryTracker(round_to=CUDA_BLOCK if backend.device.type == "cuda" else 1)
            self.tracker.track_backend(backend)
            self._loop.enter_context(self.tracker)

    def end_loop(self) -> None:
        """The progress bar and the tracker end with the loop; the final eval and export are not tracked."""
        self._loop.close()
        self.pbar = None

    def record(self, rec: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
        if self.tb:
            self.tb.log(rec)

    def say(self, msg: str) -> None:
        """A line for the user that does not break the progress bar."""
        (self.pbar.write(msg) if self.pbar else say(self.env, msg))

    def step_done(self, step: int, stats: StepStats, tps: float) -> None:
        if self.pbar:
            self.pbar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{stats.lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            self.pbar.update(1)
        elif self.env.is_main and (step % self.cfg.logging.log_every == 0 or step == self.total_steps):
            print(f"step {step}/{self.total_steps} loss {stats.loss:.4f} lr {stats.lr:.2e} tok/s {tps:,.0f}",
                  flush=True)

    def tracked(self) -> dict | None:
        if self.tracker is None:
            return None
        self.tracker.refresh_optimizers()
        return self.tracker.summary()


class TrainingRecipe:
    """One run of `engine train`. Build it, then `setup_data()`, `setup_backend()`, `resume()`, and inside
    `with RunLog(...)`, `train()` and `finish()` (`run_training` does all of it)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, stop: StopSignal | None = None, on_eval=None):
        # on_eval(step, eval metrics) -> True ends the run (RunPruned) at that eval: a sweep's pruning.
        self.env, self.stop, self.on_eval = env, stop, on_eval
        self.out = check_output_dir(cfg, resuming=bool(cfg.checkpoint.resume))
        # `memory.precision: auto` and the label names become concrete here: the run's own config says what it ran.
        self.device = pick_device(cfg.train.device)
        precision, why = resolve_precision(cfg.memory.precision, self.device)
        if cfg.memory.precision == "auto":
            say(env, f"precision: {precision} ({why}; memory.precision=auto)")
        self.cfg = cfg.updated({"memory.precision": precision})
        self.state = TrainState()
        self.resume_from = resolve_resume(cfg.checkpoint.resume, self.out, warn=lambda m: say(env, m))

    # -- setup, one job each ----------------------------------------------------------------------------------------
    def setup_data(self) -> None:
        """Tokenizer, splits, sampler, the run's plan and layout. Data first: a bad file costs seconds, not a model."""
        env = self.env
        self.tok = load_tokenizer(self.cfg.model)
        self.sampler = self.make_sampler()
        cfg = self.cfg  # classification: now with its label names
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.sampler.steps_per_epoch
        g, accum = self.sampler.global_batch, self.sampler.accum
        train_examples = len(self.splits["train"]) if "train" in self.splits else None  # a stream's is unknown
        self.plan = {"backend": cfg.backend_for(env.world_size), "world_size": env.world_size,
                     "grad_accum_steps": accum, "global_batch": g, "train_examples": train_examples,
                     "steps_per_epoch": self.sampler.steps_per_epoch, "total_steps": self.total_steps,
                     "tokens_per_step": g * cfg.data.block_size, "precision": cfg.memory.precision}
        self.layout = run_layout(cfg, env.world_size, g, self.tok)
        self.resume_plan: ResumePlan | None = None
        if self.resume_from is not None:  # decided now, before any model loads
            self.resume_plan = plan_resume(self.resume_from, self.layout, cfg.checkpoint.allow_layout_change)
            for note in self.resume_plan.notes:
                say(env, note)
        elif cfg.checkpoint.resume:
            replacing = (self.out / RUN_MARKER).exists()
            say(env, f"no complete checkpoint in {self.out}: starting from scratch"
                     + (" (replacing the metrics of the run that left none)" if replacing else ""))
        val = self.splits.get("validation")
        self.val_batches = (eval_batches(val, cfg.train.micro_batch_size, self.tok.pad_token_id, cfg.eval.max_batches)
                            if val else [])

    def make_sampler(self) -> Sampler:
        """The splits (classification: label names become part of the run's config) and the train sampler."""
        cfg, env = self.cfg, self.env
        accum, micro = cfg.train.accum_steps(env.world_size), cfg.train.micro_batch_size
        if cfg.data.streaming:
            max_eval = cfg.eval.max_batches * micro if cfg.eval.max_batches else None
            stream, self.splits = streamed_splits(cfg.data, self.tok, max_eval)
            return StreamSampler(stream, micro, accum, env.world_size, env.rank, self.tok.pad_token_id)
        if cfg.task == "classification":
            self.splits, labels = load_classification_splits(cfg, self.tok)
            self.cfg = cfg.updated({"classification.labels": labels})  # label names travel with the run
        else:
            self.splits = load_splits(cfg.data, self.tok, with_test=cfg.data.test_file is not None)
        return StepSampler(self.splits["train"], micro, accum, env.world_size, env.rank, cfg.train.seed,
                           self.tok.pad_token_id)

    def check_memory(self) -> None:
        """The pre-flight: stop before loading a model predicted not to fit (engine/preflight.py)."""
        predicted = preflight(self.cfg, self.env, self.device.type)
        if predicted is not None:
            self.plan["predicted_peak_mib"] = round(predicted["device_bytes"] / 2**20, 1)
            say(self.env, f"pre-flight: predicted peak {predicted['device_bytes'] / 2**30:.2f} GiB per rank on "
                          f"{self.device.type} ({predicted['kernel']} kernels, simulated)"
                          + (f", {predicted['available_bytes'] / 2**30:.1f} GiB available"
                             if predicted.get("available_bytes") else ""))

    def setup_backend(self) -> None:
        cfg, env, tok = self.cfg, self.env, self.tok
        model = build_model(cfg, vocab_size=len(tok), special_ids={
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
        self.counts = parameter_counts(model)
        if cfg.train.compile_blocks:  # after every module swap (LoRA, NF4), before DeepSpeed wraps the model
            self.compiled_blocks, self.compile_start = compile_blocks(model), compile_seconds()
        self.backend = make_backend(cfg, env, model, self.total_steps)
        self.guard = BadStepGuard(cfg.train.max_bad_steps)
        self.stopper = EarlyStopping(cfg.eval.early_stopping)
        # Written only once the model and backend exist, so a failed start leaves no half-made run behind.
        if env.is_main:
            if (cfg.logging.overwrite or cfg.checkpoint.resume) and self.resume_from is None:
                clear_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG).write_text(config_to_yaml(cfg))
            (self.out / RUN_MARKER).write_text(json.dumps({"plan": self.plan, "started": time.time()}, indent=2))
        say(env, f"model {cfg.model.name} ({cfg.model.init}): {self.counts['total']:,} params, "
                 f"{self.counts['trainable']:,} trainable | backend {self.backend.name} x{env.world_size} on "
                 f"{self.backend.device} | {cfg.memory.precision} | {self.total_steps} steps of "
                 f"{self.sampler.global_batch} x {cfg.data.block_size} tokens")

    def resume(self) -> None:
        plan = self.resume_plan
        if plan is None:
            return
        st = load_trainer_state(plan.checkpoint, self.env.rank)  # restores RNG: after the model's random init
        try:
            done = plan.carry_out(self.backend)
        except (ValueError, KeyError, RuntimeError) as e:
            raise EngineError(f"cannot resume {plan.checkpoint}: its state does not fit this model/optimizer ({e})") \
                from None
        if plan.how != "exact":
            say(self.env, done)
        if self.env.is_main:
            truncate_metrics(self.out / METRICS, st["step"])
        self.state.load_state_dict(st, plan.checkpoint)
        self.sampler.load_state_dict(st["data"])
        self.guard.load_state_dict(st.get("guard", {}))
        self.stopper.load_state_dict(st.get("early_stopping"))
        say(self.env, f"resumed from {plan.checkpoint} at step {self.state.step}")

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, log: RunLog) -> Path | None:
        """Steps until the last one, an early stop or a stop signal; returns the preemption checkpoint, if any."""
        st, backend = self.state, self.backend
        self.log, self.start_step, self.first_loss, self.last_loss = log, st.step, None, None
        self.compile_s = 0.0  # seconds torch.compile has taken in this run (train.compile_blocks)
        self.meter = MemoryMeter(backend.device)
        log.open(st.step, self.resume_from is not None, backend)
        try:
            return self.run_steps()
        finally:
            log.end_loop()

    def run_steps(self) -> Path | None:
        """The step loop itself (nanoGPT-style: one screen, top to bottom)."""
        st, sampler, backend = self.state, self.sampler, self.backend
        t_last, tok_last = time.perf_counter(), st.tokens_seen
        while st.step < self.total_steps and not self.stopper.should_stop:
            epoch, batches = sampler.step_batches(st.step)
            stats = backend.train_step(batches)
            st.step += 1
            st.tokens_seen += stats.tokens
            self.first_loss = stats.loss if self.first_loss is None else self.first_loss
            self.last_loss = stats.loss
            now = time.perf_counter()
            tps = (st.tokens_seen - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, st.tokens_seen
            self.record_step(epoch, stats, tps)
            self.check_step(stats)  # raises, with the state saved, after too many non-finite steps
            is_last = st.step == self.total_steps
            if not is_last and self.maybe_eval():
                break  # early stopping
            if not is_last:
                self.maybe_checkpoint()
            # Collective when several ranks run (the signal may reach only some): every rank stops at the same step.
            if backend.any_rank(self.stop is not None and self.stop.signum is not None) and not is_last:
                return self.checkpoint()
            t_last = time.perf_counter()  # evaluation and checkpoint time is not the next step's throughput
        return None

    def record_step(self, epoch: int, stats: StepStats, tps: float) -> None:
        rec = {"step": self.state.step, "epoch": epoch, "loss": stats.loss, "lr": stats.lr,
               "grad_norm": stats.grad_norm, "tokens": self.state.tokens_seen, "tokens_per_s": tps,
               **self.meter.readings(), "skipped": stats.skipped}
        if stats.loss_scale is not None:
            rec["loss_scale"] = stats.loss_scale
        tracked = self.log.tracked()
        if tracked is not None:
            rec["tracked"] = tracked
        if self.cfg.train.compile_blocks:  # compiling happens in the steps that need it (the first, a new shape)
            spent = round(compile_seconds() - self.compile_start, 2)
            if spent != self.compile_s:
                if self.compile_s == 0:
                    say(self.env, f"compiled {self.compiled_blocks} blocks in {spent:.1f} s (torch.compile, at step "
                                  f"{self.state.step})")
                self.compile_s = rec["compile_s"] = spent
        self.log.record(rec)
        self.log.step_done(self.state.step, stats, tps)

    def check_step(self, stats: StepStats) -> None:
        step = self.state.step
        problem = self.guard.check(step, stats.loss, stats.skipped, stats.loss_scale)
        if problem:
            good = self.state.last_good
            path = self.checkpoint()
            raise EngineError(f"training stopped at step {step}: {problem}. State saved in {path}"
                              + (f"; the last checkpoint before the trouble is {good}" if good else ""))

    def maybe_eval(self) -> bool:
        """The periodic eval (and the best checkpoint it may make); True when early stopping ends the run."""
        every, step = self.cfg.eval.every_n_steps, self.state.step
        if not (self.val_batches and every and step % every == 0):
            return False
        ev = self.evaluate(self.val_batches)
        self.state.best_val = min(self.state.best_val, ev["val_loss"])
        self.log.record({"step": step, **ev})
        self.log.say(f"step {step}: {eval_line(ev)}")
        if self.on_eval is not None and self.backend.any_rank(bool(self.on_eval(step, ev))):
            raise RunPruned(step)
        if self.stopper.update(step, ev["val_loss"]) and self.cfg.checkpoint.keep_best:
            self.checkpoint()  # the new best; kept past keep_last
        if self.stopper.should_stop:
            self.log.record({"step": step, "early_stop": self.stopper.state_dict()})
            self.log.say(self.stopper.message())
        return self.stopper.should_stop

    def maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint.every_n_steps
        if every and self.state.step % every == 0:
            self.checkpoint()  # a no-op when this step was just saved as the best

    def evaluate(self, batches: list[dict], prefix: str = "val") -> dict:
        mine, weights = rank_share(batches, self.env.rank, self.env.world_size)
        if self.cfg.task == "classification":
            return evaluate_classifier(self.backend, mine, weights, self.cfg.classification.labels, prefix)
        return lm_metrics(*self.backend.eval_loss(mine, weights), prefix)

    def checkpoint(self) -> Path:
        st = self.state
        if st.last_checkpoint is not None and st.last_checkpoint.name == checkpoint_name(st.step):
            return st.last_checkpoint  # already saved at this step
        trainer_state = {**st.state_dict(self.sampler.state_dict()),
                         "guard": self.guard.state_dict(), "layout": self.layout, "early_stopping": self.stopper.state_dict()}
        keep = kept_checkpoints(self.stopper.best_checkpoint_name() if self.cfg.checkpoint.keep_best else None,
                                bool(self.guard.run), st.last_good)
        path = save_checkpoint(self.backend, st.step, trainer_state, self.out, self.cfg.checkpoint.keep_last, keep=keep,
                               tokenizer=self.tok)
        st.last_checkpoint = path
        if not self.guard.run:
            st.last_good = path
        say(self.env, f"checkpoint saved: {path}")
        return path

    # -- the end -------------------------------------------------------------------------------------------------
    def final_evals(self, summary: dict) -> None:
        step = self.state.step
        if self.val_batches and self.cfg.eval.at_end:
            ev = self.evaluate(self.val_batches)
            self.state.best_val = min(self.state.best_val, ev["val_loss"])
            self.stopper.update(step, ev["val_loss"], count=False)
            self.log.record({"step": step, **ev})
            summary.update(ev)
            say(self.env, f"final: {eval_line(ev)}")
        if "test" in self.splits:
            test = eval_batches(self.splits["test"], self.cfg.train.micro_batch_size, self.tok.pad_token_id)
            ev = self.evaluate(test, prefix="test")
            summary.update(ev)
            self.log.record({"step": step, **ev})
            say(self.env, f"test: {eval_line(ev, 'test')}")

    def export(self, summary: dict) -> None:
        """The final checkpoint, then the HF export of the final (or, with keep_best, the best) checkpoint, through
        the one export path (`engine export` takes it too): the checkpoint's layout reads its weights (fp32 masters
        where the run kept them) into a model built from the run's config. The training state is released first:
        the export builds a model of its own."""
        cfg, st, env = self.cfg, self.state, self.env
        if st.step > self.start_step or self.resume_from is None:
            self.checkpoint()
        export_from = st.last_checkpoint
        if cfg.checkpoint.keep_best and self.stopper.best_step not in (None, st.step):
            export_from = checkpoints_dir(self.out) / self.stopper.best_checkpoint_name()
            say(env, f"exporting the best checkpoint: {export_from} (val_loss {self.stopper.best:.4f})")
        summary["best"] = {"step": self.stopper.best_step,
                           "val_loss": None if self.stopper.best_step is None else self.stopper.best,
                           "early_stopped_at": self.stopper.stopped_at}
        barrier = self.backend.barrier
        self.backend = None  # the model, optimizer and gradients: what follows reads the checkpoint or the export
        gc.collect()
        if env.is_main:
            _, written = export_checkpoint(export_from, self.out, replace=True, config=cfg)
            summary["export"] = {k: str(v) for k, v in written.items()}
            for k, v in written.items():
                print(f"exported {k}: {v}", flush=True)
        barrier()

    def finish(self) -> dict:
        """After the loop: final evals, checkpoint and export, the sample, summary.json; the plots after the log."""
        summary = {"steps": self.state.step, "first_loss": self.first_loss, "last_loss": self.last_loss,
                   "tokens_seen": self.state.tokens_seen, **self.meter.readings(), "params": self.counts}
        if self.cfg.train.compile_blocks:
            summary["compile_s"] = self.compile_s
        tracked = self.log.tracker.summary() if self.log.tracker is not None else None
        if tracked is not None:
            summary["tracked_memory"] = tracked
        self.final_evals(summary)
        self.export(summary)
        if self.env.is_main:
            cfg = self.cfg
            if "model" in summary.get("export", {}) and cfg.sample.max_new_tokens and cfg.task == "causal_lm":
                template = cfg.data.prompt_template if cfg.data.prompt_field is not None else "{prompt}"
                text = sample_text(Path(summary["export"]["model"]), cfg.sample, template=template)
                summary["sample"] = text
                print(f"\nsample ({cfg.sample.prompt!r}):\n{text}\n", flush=True)
            (self.out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        return summary

    def draw_plots(self) -> None:
        if not (self.env.is_main and self.cfg.logging.plots):
            return
        try:
            say(self.env, f"plots: {self.out / PLOTS_DIR}/*.png ({len(plot_run(self.out))} files)")
        except Exception as e:  # the run itself is saved: a drawing problem must not fail it
            say(self.env, f"plots not written: {e}")


def dry_run(cfg: RunConfig) -> dict:
    """`engine train --dry-run`: validate the config and the data, run the pre-flight, print the plan (and the
    DeepSpeed config); no model is built and nothing is written."""
    env = dist_env()
    recipe = TrainingRecipe(cfg, env)
    recipe.setup_data()
    recipe.check_memory()
    plan = recipe.plan
    if plan["backend"] == "deepspeed":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        plan["deepspeed_config"] = make_ds_config(recipe.cfg, env.world_size, device,
                                                  load_user_ds_json(cfg.train.deepspeed_config))
    say(env, config_to_yaml(recipe.cfg))
    say(env, json.dumps(plan, indent=2))
    return plan


def run_training(cfg: RunConfig, on_eval=None) -> dict:
    """`engine train`: the whole run; returns its summary (or, when a stop signal ended it, where it was saved).
    `on_eval(step, eval metrics)`: called at each periodic eval; True ends the run there (`RunPruned`)."""
    env = dist_env()
    return_freed_host_memory(cfg.memory.release_host_memory)  # host RAM then tracks the live tensors
    keep_freed_host_memory(cfg.memory.keep_host_memory)  # or large host blocks are reused, not faulted in afresh
    torch.manual_seed(cfg.train.seed)
    # SIGTERM/SIGINT during the run: finish the step, save, return (exit 0); handlers restored afterwards.
    with StopSignal() as stop:
        recipe = TrainingRecipe(cfg, env, stop, on_eval)
        recipe.setup_data()
        recipe.check_memory()
        recipe.setup_backend()
        recipe.resume()
        with RunLog(recipe.cfg, env, recipe.out, recipe.total_steps) as log:
            preempted = recipe.train(log)
            if preempted is not None:
                say(env, f"stopped by {stop.name or 'a signal on another rank'} at step {recipe.state.step}/"
                         f"{recipe.total_steps}: checkpoint saved in {preempted}. Resume with the same command plus "
                         "--resume (or checkpoint.resume=true).")
                return {"steps": recipe.state.step, "preempted": True, "checkpoint": str(preempted)}
            summary = recipe.finish()
        recipe.draw_plots()
    return summary
