"""THE step loop: data -> model -> backend, eval, metrics, checkpoints, export, sample.

Everything memory-related happens in `engine/model.py` (module graph) and `engine/backends/`
(precision, ZeRO, optimizer); this file only sequences a run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from engine.backends.base import Backend
from engine.checkpoint import (checkpoint_name, checkpoints_dir, export_model, load_trainer_state, resolve_resume,
                               save_checkpoint, tokenizer_fingerprint)
from engine.config import RunConfig, config_to_yaml
from engine.data import StepSampler, eval_batches, load_splits, load_tokenizer
from engine.distributed import DistEnv, dist_env
from engine.early_stopping import EarlyStopping
from engine.errors import ConfigError, EngineError
from engine.evaluate import eval_line
from engine.guards import BadStepGuard, StopSignal
from engine.memory.meter import MemoryMeter
from engine.model import build_model, parameter_counts


def choose_backend(cfg: RunConfig, env: DistEnv) -> str:
    if cfg.memory.optimizer_in_backward and env.launched:
        raise ConfigError(
            f"memory.optimizer_in_backward runs on one device, but the launcher started {env.world_size} processes: "
            "launch one process, or turn optimizer_in_backward off and use ZeRO"
        )
    if cfg.train.backend != "auto":
        if cfg.train.backend == "torch" and env.launched:
            raise ConfigError(
                f"train.backend=torch runs one process but the launcher started {env.world_size}: use train.backend=deepspeed"
            )
        return cfg.train.backend
    return "deepspeed" if env.launched or cfg.memory.zero_stage > 0 else "torch"


def make_backend(cfg: RunConfig, env: DistEnv, model, total_steps: int) -> Backend:
    if choose_backend(cfg, env) == "deepspeed":
        from engine.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg, env, model, total_steps)
    from engine.backends.torch_backend import TorchBackend

    return TorchBackend(cfg, env, model, total_steps)


def _say(env: DistEnv, *msg) -> None:
    if env.is_main:
        print(*msg, flush=True)


def check_output_dir(cfg: RunConfig, resuming: bool) -> Path:
    """Never silently overwrite another run's results."""
    out = Path(cfg.logging.output_dir)
    if out.exists() and not out.is_dir():
        raise EngineError(f"logging.output_dir {out} exists and is not a folder")
    marker = out / "run.json"
    if marker.exists() and not resuming and not cfg.logging.overwrite:
        raise EngineError(
            f"{out} already holds a run: pass checkpoint.resume=true to continue it, logging.overwrite=true to replace "
            "it, or choose another logging.output_dir"
        )
    return out


def run_layout(cfg: RunConfig, env: DistEnv, global_batch: int, tokenizer) -> dict:
    """What a checkpoint's state depends on; a resume must match it."""
    m = cfg.model
    return {
        "model": m.name, "init": m.init, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
        "vocab_size": len(tokenizer), "tokenizer": tokenizer_fingerprint(tokenizer), "seed": cfg.train.seed,
        "block_size": cfg.data.block_size, "world_size": env.world_size, "global_batch": global_batch,
        "optimizer": cfg.optim.name, "optimizer_in_backward": cfg.memory.optimizer_in_backward,
        "zero_stage": cfg.memory.zero_stage, "precision": cfg.memory.precision,
        "lora": cfg.memory.lora.model_dump() if cfg.memory.lora.enabled else None,
        "freeze": cfg.memory.freeze.model_dump(),
    }


# May differ on resume with checkpoint.allow_layout_change; the rest decides what the saved state means.
SOFT_LAYOUT = ("world_size", "global_batch", "seed", "block_size", "optimizer")


def check_layout(ckpt: Path, layout: dict, allow_change: bool, warn) -> None:
    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")).get("layout", {})
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot resume {ckpt}: its trainer_state.json is unreadable ({e})") from None
    diffs = {k: f"{k}={saved[k]!r} there, {v!r} now" for k, v in layout.items() if k in saved and saved[k] != v}
    hard = [d for k, d in diffs.items() if not (allow_change and k in SOFT_LAYOUT)]
    if hard:
        hint = "" if allow_change or set(diffs) - set(SOFT_LAYOUT) else \
            " (checkpoint.allow_layout_change=true resumes anyway, as a new data order)"
        raise EngineError(f"cannot resume {ckpt}: it was saved with a different setup ({'; '.join(hard)}){hint}")
    if diffs:
        warn(f"warning: resuming {ckpt} with a changed setup ({'; '.join(diffs.values())}): not an exact continuation")


def clear_run(out: Path) -> None:
    """logging.overwrite: remove the previous run's results so nothing of it is mixed into this one."""
    import shutil

    for name in ("checkpoints", "model", "adapter", "tensorboard", "plots"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json", "run.json"):
        (out / name).unlink(missing_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    path.write_text("".join(l + "\n" for l in keep))


def run_training(cfg: RunConfig, dry_run: bool = False) -> dict:
    # SIGTERM/SIGINT during the run: finish the step, save, return (exit 0); handlers restored afterwards.
    with StopSignal() as stop:
        return _run_training(cfg, dry_run, stop)


def _run_training(cfg: RunConfig, dry_run: bool, stop: StopSignal) -> dict:
    env = dist_env()
    torch.manual_seed(cfg.train.seed)
    out = check_output_dir(cfg, resuming=bool(cfg.checkpoint.resume))
    resume_from = resolve_resume(cfg.checkpoint.resume, out, warn=lambda m: _say(env, m))

    # Data first: a bad file costs seconds, not a gpt2-xl load.
    tok = load_tokenizer(cfg.model)
    if cfg.task == "classification":
        from engine.classify import load_classification_splits

        splits, cfg.classification.labels = load_classification_splits(cfg, tok)  # label names travel with the run
    else:
        splits = load_splits(cfg.data, tok, with_test=cfg.data.test_file is not None)
    from engine.backends.deepspeed_backend import grad_accum_steps

    accum = grad_accum_steps(cfg, env.world_size)
    sampler = StepSampler(splits["train"], cfg.train.micro_batch_size, accum, env.world_size, env.rank, cfg.train.seed,
                          tok.pad_token_id)
    total_steps = cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch
    backend_name = choose_backend(cfg, env)
    plan = {
        "backend": backend_name,
        "world_size": env.world_size,
        "grad_accum_steps": accum,
        "global_batch": sampler.global_batch,
        "train_examples": len(splits["train"]),
        "steps_per_epoch": sampler.steps_per_epoch,
        "total_steps": total_steps,
        "tokens_per_step": sampler.global_batch * cfg.data.block_size,
    }
    layout = run_layout(cfg, env, sampler.global_batch, tok)
    if resume_from is not None:
        check_layout(resume_from, layout, cfg.checkpoint.allow_layout_change, warn=lambda m: _say(env, m))
    elif cfg.checkpoint.resume:
        _say(env, f"no complete checkpoint in {out}: starting from scratch"
                  + (" (replacing the metrics of the run that left none)" if (out / "run.json").exists() else ""))
    from engine.backends.torch_backend import pick_device
    from engine.preflight import preflight

    device_type = pick_device(cfg.train.device).type
    predicted = preflight(cfg, env, device_type)
    if predicted is not None:
        plan["predicted_peak_mib"] = round(predicted["device_bytes"] / 2**20, 1)
        _say(env, f"pre-flight: predicted peak {predicted['device_bytes'] / 2**30:.2f} GiB per rank on {device_type} "
                  f"({predicted['kernel']} kernels, simulated)"
                  + (f", {predicted['available_bytes'] / 2**30:.1f} GiB available" if predicted.get("available_bytes") else ""))
    if dry_run:
        if backend_name == "deepspeed":
            from engine.backends.deepspeed_backend import make_ds_config

            from engine.backends.deepspeed_backend import load_user_ds_json

            plan["deepspeed_config"] = make_ds_config(cfg, env.world_size, "cuda" if torch.cuda.is_available() else "cpu",
                                                      load_user_ds_json(cfg.train.deepspeed_config))
        _say(env, config_to_yaml(cfg))
        _say(env, json.dumps(plan, indent=2))
        return plan

    model = build_model(cfg, vocab_size=len(tok), special_ids={
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    counts = parameter_counts(model)
    backend = make_backend(cfg, env, model, total_steps)
    # Written only once the model and backend exist, so a failed start leaves no half-made run behind.
    if env.is_main:
        if (cfg.logging.overwrite or cfg.checkpoint.resume) and resume_from is None:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
        (out / "run.json").write_text(json.dumps({"plan": plan, "started": time.time()}, indent=2))
    _say(env, f"model {cfg.model.name} ({cfg.model.init}): {counts['total']:,} params, {counts['trainable']:,} trainable | "
              f"backend {backend.name} x{env.world_size} on {backend.device} | {cfg.memory.precision} | "
              f"{total_steps} steps of {sampler.global_batch} x {cfg.data.block_size} tokens")

    step, tokens_seen, best_val = 0, 0, math.inf
    guard = BadStepGuard(cfg.train.max_bad_steps)
    stopper = EarlyStopping(cfg.eval.early_stopping)
    if resume_from is not None:
        st = load_trainer_state(resume_from, env.rank)  # restores RNG: after the model's random init
        try:
            backend.load(resume_from)
        except (ValueError, KeyError, RuntimeError) as e:
            raise EngineError(f"cannot resume {resume_from}: its state does not fit this model/optimizer ({e})") from None
        if env.is_main:
            truncate_metrics(out / "metrics.jsonl", st["step"])
        step, tokens_seen, best_val = st["step"], st["tokens_seen"], st.get("best_val", math.inf)
        guard.load_state_dict(st.get("guard", {}))
        stopper.load_state_dict(st.get("early_stopping"))
        _say(env, f"resumed from {resume_from} at step {step}")

    meter = MemoryMeter(backend.device)
    tracker = None
    if cfg.logging.track_memory:
        from engine.memory.tracker import CUDA_BLOCK, MemoryTracker

        tracker = MemoryTracker(round_to=CUDA_BLOCK if backend.device.type == "cuda" else 1)
        tracker.track_model(getattr(backend.model, "module", backend.model))
        for opt in backend.optimizers():
            tracker.track_optimizer(opt)
            tracker.track_attributes(opt, "optimizer")  # ZeRO's fp32 partitions live in attributes
        tracker.__enter__()
    metrics_path = out / "metrics.jsonl"
    metrics = open(metrics_path, "a", encoding="utf-8") if env.is_main else None
    from engine.report import open_tensorboard

    tb = open_tensorboard(cfg.logging.tensorboard and env.is_main, out, purge_step=step + 1 if resume_from else None)
    val = splits.get("validation")
    val_batches = eval_batches(val, cfg.train.micro_batch_size, tok.pad_token_id, cfg.eval.max_batches) if val else []

    def log(rec: dict) -> None:
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if tb:
            tb.log(rec)

    def evaluate(batches: list[dict], prefix: str = "val") -> dict:
        mine = batches[env.rank :: env.world_size]
        # Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively): pad with
        # zero-weight repeats.
        n_max = math.ceil(len(batches) / env.world_size)
        weights = [1.0] * len(mine) + [0.0] * (n_max - len(mine))
        mine = mine + [batches[0]] * (n_max - len(mine))
        if cfg.task == "classification":
            from engine.classify import evaluate_classifier

            return evaluate_classifier(backend, mine, weights, cfg.classification.labels, prefix)
        s, n = backend.eval_loss(mine, weights)
        loss = s / max(n, 1)
        return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 50))}

    last_checkpoint: list[Path | None] = [resume_from]
    last_good: list[Path | None] = [resume_from]  # saved before the current run of non-finite steps began

    def checkpoint(step: int) -> Path:
        if last_checkpoint[0] is not None and last_checkpoint[0].name == checkpoint_name(step):
            return last_checkpoint[0]  # already saved at this step
        epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
        state = {"step": step, "tokens_seen": tokens_seen, "best_val": best_val, "guard": guard.state_dict(),
                 # the data position: epoch e's order is randperm(shuffle_seed + e); the next step is in_epoch
                 "data": {"epoch": epoch, "step_in_epoch": in_epoch, "shuffle_seed": cfg.train.seed},
                 "epoch": epoch, "layout": layout, "early_stopping": stopper.state_dict()}
        keep = {stopper.best_checkpoint_name()} if cfg.checkpoint.keep_best and stopper.best_step else set()
        if guard.run and last_good[0]:
            keep.add(last_good[0].name)  # while steps are failing, retention must not prune the last good state
        path = save_checkpoint(backend, step, state, out, cfg.checkpoint.keep_last, keep=keep, tokenizer=tok)
        last_checkpoint[0] = path
        if not guard.run:
            last_good[0] = path
        _say(env, f"checkpoint saved: {path}")
        return path

    pbar = None
    if env.is_main and cfg.logging.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    first_loss = last_loss = None
    t_last, tok_last = time.perf_counter(), tokens_seen
    perm_epoch, perm = -1, None
    start_step = step
    preempted: Path | None = None
    while step < total_steps and not stopper.should_stop:
        epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, sampler.permutation(epoch)
        stats = backend.train_step(sampler.micro_batches(epoch, in_epoch, perm))
        step += 1
        tokens_seen += stats.tokens
        first_loss = stats.loss if first_loss is None else first_loss
        last_loss = stats.loss
        now = time.perf_counter()
        tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
        t_last, tok_last = now, tokens_seen
        rec = {"step": step, "epoch": epoch, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
               "tokens": tokens_seen, "tokens_per_s": tps, **meter.readings(), "skipped": stats.skipped}
        if stats.loss_scale is not None:
            rec["loss_scale"] = stats.loss_scale
        if tracker is not None:
            if cfg.memory.optimizer_in_backward:
                for opt in backend.optimizers():
                    tracker._tag_optimizer_state(opt)
            rec["tracked"] = tracker.summary()
        log(rec)
        if pbar:
            pbar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{stats.lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            pbar.update(1)
        elif env.is_main and (step % cfg.logging.log_every == 0 or step == total_steps):
            print(f"step {step}/{total_steps} loss {stats.loss:.4f} lr {stats.lr:.2e} tok/s {tps:,.0f}", flush=True)
        problem = guard.check(step, stats.loss, stats.skipped, stats.loss_scale)
        if problem:
            path, good = checkpoint(step), last_good[0]
            raise EngineError(f"training stopped at step {step}: {problem}. State saved in {path}"
                              + (f"; the last checkpoint before the trouble is {good}" if good else ""))
        is_last = step == total_steps
        if val_batches and cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and not is_last:
            ev = evaluate(val_batches)
            best_val = min(best_val, ev["val_loss"])
            log({"step": step, **ev})
            msg = f"step {step}: {eval_line(ev)}"
            (pbar.write(msg) if pbar else _say(env, msg))
            if stopper.update(step, ev["val_loss"]) and cfg.checkpoint.keep_best:
                checkpoint(step)  # the new best; kept past keep_last
            if stopper.should_stop:
                log({"step": step, "early_stop": stopper.state_dict()})
                msg = stopper.message()
                (pbar.write(msg) if pbar else _say(env, msg))
                break
        if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0 and not is_last:
            checkpoint(step)  # a no-op when this step was just saved as the best
        # Collective when several ranks run (the signal may reach only some): every rank stops at the same step.
        if backend.any_rank(stop.signum is not None) and not is_last:
            preempted = checkpoint(step)
            break
        t_last = time.perf_counter()  # evaluation and checkpoint time is not the next step's throughput
    if pbar:
        pbar.close()
    if tracker is not None:
        tracker.__exit__(None, None, None)
    if preempted:
        if metrics:
            metrics.close()
        if tb:
            tb.close()
        _say(env, f"stopped by {stop.name or 'a signal on another rank'} at step {step}/{total_steps}: checkpoint "
                  f"saved in {preempted}. Resume with the same command plus --resume (or checkpoint.resume=true).")
        return {"steps": step, "preempted": True, "checkpoint": str(preempted)}

    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "tokens_seen": tokens_seen,
               **meter.readings(), "params": counts}
    if tracker is not None:
        summary["tracked_memory"] = tracker.summary()
    if val_batches and cfg.eval.at_end:
        ev = evaluate(val_batches)
        best_val = min(best_val, ev["val_loss"])
        stopper.update(step, ev["val_loss"], count=False)
        log({"step": step, **ev})
        summary.update(ev)
        _say(env, f"final: {eval_line(ev)}")
    if "test" in splits:
        ev = evaluate(eval_batches(splits["test"], cfg.train.micro_batch_size, tok.pad_token_id), prefix="test")
        summary.update(ev)
        log({"step": step, **ev})
        _say(env, f"test: {eval_line(ev, 'test')}")
    if step > start_step or resume_from is None:
        checkpoint(step)
    export_from = last_checkpoint[0]
    if cfg.checkpoint.keep_best and stopper.best_step not in (None, step):
        export_from = checkpoints_dir(out) / stopper.best_checkpoint_name()
        backend.load(export_from)  # export the best weights
        _say(env, f"exporting the best checkpoint: {export_from} (val_loss {stopper.best:.4f})")
    summary["best"] = {"step": stopper.best_step, "val_loss": None if stopper.best_step is None else stopper.best,
                       "early_stopped_at": stopper.stopped_at}
    with backend.full_weights(export_from) as full:
        if env.is_main:
            written = export_model(full, tok, out, merge_lora=cfg.checkpoint.export_merged_lora)
            summary["export"] = {k: str(v) for k, v in written.items()}
            for k, v in written.items():
                print(f"exported {k}: {v}", flush=True)
    backend.barrier()
    if env.is_main:
        if "model" in summary.get("export", {}) and cfg.sample.max_new_tokens and cfg.task == "causal_lm":
            from engine.generate import sample_text

            text = sample_text(Path(summary["export"]["model"]), cfg.sample)
            summary["sample"] = text
            print(f"\nsample ({cfg.sample.prompt!r}):\n{text}\n", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if metrics:
        metrics.close()
    if tb:
        tb.close()
    if env.is_main and cfg.logging.plots:
        from engine.report import plot_run

        try:
            _say(env, f"plots: {out / 'plots'}/*.png ({len(plot_run(out))} files)")
        except Exception as e:  # the run itself is saved: a drawing problem must not fail it
            _say(env, f"plots not written: {e}")
    return summary
