
import pytest

from engine.backends.deepspeed_backend import make_ds_config
from engine.config import preset_dir
from engine.config import describe_schema, load_config, parse_override
from engine.errors import ConfigError

PRESETS = sorted(preset_dir().glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"cpu_default", "gpt2-xl_full_t4", "gpt2-large_lora_8gb", "gpt2-xl_zero3_node", "gpt2-xl_zero2_offload",
            "cpu_sentiment"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_builds_a_deepspeed_config(path):
    cfg = load_config([path])
    ds = make_ds_config(cfg, world_size=8, device_type="cuda")
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    assert ds["zero_optimization"]["stage"] == cfg.memory.zero_stage


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-5", "memory.zero_stage=2", "memory.lora.target_modules=[c_attn]", "train.max_steps=7"])
    assert cfg.optim.lr == 3e-5 and cfg.memory.zero_stage == 2 and cfg.memory.lora.target_modules == ["c_attn"]
    assert parse_override("data.train_file=/a=b.txt") == ("data.train_file", "/a=b.txt")


def test_later_file_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("optim:\n  lr: 0.1\n  weight_decay: 0.5\n")
    b.write_text("optim:\n  lr: 0.2\n")
    cfg = load_config([a, b])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.2, 0.5)


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key .*known keys in optim: name, lr.*from .*bad\.yaml"):
        load_config([f])


def test_wrong_type_names_key_and_source():
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: .*integer.*from the command line"):
        load_config(None, ["train.micro_batch_size=lots"])


@pytest.mark.parametrize("override,needle", [
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("memory.zero_stage=4", "memory.zero_stage"),
    ("data.mode=padded", "data.mode"),
    ("memory.precision=fp8", "memory.precision"),
])
def test_bad_values(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,message", [
    (["memory.zero_stage=2", "memory.offload_optimizer=true", "optim.name=adamw_8bit"],
     "optim.name=adamw_8bit cannot run on offloaded optimizer state"),
    (["memory.zero_stage=3", "memory.offload_optimizer=true", "optim.name=paged_adamw_8bit"],
     "optim.name=paged_adamw_8bit cannot run on offloaded optimizer state"),
    (["optim.name=cpu_adam"], "cpu_adam .* needs memory.offload_optimizer=true"),
    (["memory.offload_optimizer=true"], "memory.offload_optimizer needs ZeRO"),
    (["memory.zero_stage=2", "memory.offload_params=true"], "memory.offload_params needs memory.zero_stage=3"),
    (["memory.zero_stage=2", "train.backend=torch"], "needs the DeepSpeed backend"),
    (["memory.checkpoint_every_n_layers=2"], "activation_checkpointing=false"),
    (["memory.lora.enabled=true", "memory.freeze.embeddings=true"], "LoRA already freezes"),
    (["model.init=random", "model.n_positions=64", "data.block_size=128"], "exceeds the model's context of 64"),
    (["model.init=random", "data.block_size=2048"], "exceeds the model's context of 1024"),
    (["model.n_layer=2"], "only apply to model.init=random"),
    (["model.init=random", "model.n_embd=100", "model.n_head=3"], "divisible"),
    (["model.name=gpt2", "model.init=random", "memory.freeze.first_n_blocks=12"], "would freeze all 12 blocks"),
    (["memory.optimizer_in_backward=true", "optim.grad_clip=null", "memory.zero_stage=2"], "single-device torch backend"),
    (["memory.zero_stage=3", "memory.loss_chunk_size=512"], "outside ZeRO-3's gather hooks"),
    (["task=classification", "memory.loss_chunk_size=64"], "task=classification does not have .* unset memory.loss_chunk_size"),
    (["eval.every_n_steps=0", "eval.early_stopping.patience=2"], "acts on periodic evals, but eval.every_n_steps=0"),
    (["sample.greedy=true", "sample.top_p=0.9"], "greedy decoding takes the most likely token, so top_p would be ignored"),
    (["sample.greedy=true", "sample.num_sequences=2"], "greedy decoding gives one sequence per prompt"),
])
def test_incompatible_combinations_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_global_batch_must_divide_by_world_size():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=12"])
    assert cfg.train.accum_steps(1) == 3
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size 4 x world size 2 = 8"):
        cfg.train.accum_steps(2)


def test_ds_config_is_derived():
    cfg = load_config(None, ["memory.zero_stage=3", "memory.offload_optimizer=true", "memory.offload_params=true",
                             "optim.name=cpu_adam", "memory.precision=fp16", "train.micro_batch_size=2",
                             "train.grad_accum_steps=4", "optim.grad_clip=0.5"])
    ds = make_ds_config(cfg, world_size=2, device_type="cuda")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    cpu = make_ds_config(cfg, world_size=2, device_type="cpu")
    assert cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False


def test_user_deepspeed_json_is_merged(tmp_path):
    cfg = load_config(None, ["memory.zero_stage=2"])
    ds = make_ds_config(cfg, 1, "cuda", user_json={"zero_optimization": {"reduce_bucket_size": 123}, "wall_clock_breakdown": True})
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123 and ds["zero_optimization"]["stage"] == 2
    assert ds["wall_clock_breakdown"] is True


def test_schema_describes_every_leaf():
    keys = {k for k, _, _ in describe_schema()}
    assert {"optim.lr", "memory.lora.r", "memory.zero_stage", "data.mode"} <= keys
    memory_rows = [r for r in describe_schema() if r[0].startswith("memory.") and not r[0].startswith("memory.lora.")
                   and not r[0].startswith("memory.freeze.")]
    # every memory feature flag says what it saves
    assert all(desc for _, _, desc in memory_rows)


def test_torch_backend_under_a_launcher_is_rejected():
    cfg = load_config(None, ["train.backend=torch"])
    with pytest.raises(ConfigError, match="use train.backend=deepspeed"):
        cfg.backend_for(2)
    assert load_config(None, []).backend_for(2) == "deepspeed"
    in_bwd = load_config(None, ["memory.optimizer_in_backward=true", "optim.grad_clip=null"])
    with pytest.raises(ConfigError, match="optimizer_in_backward runs on one device, but the launcher started 2"):
        in_bwd.backend_for(2)
    assert load_config(None, []).backend_for(1) == "torch"


def test_launcher_env_is_read_from_deepspeed_torchrun_or_slurm():
    from engine.distributed import dist_env, export_slurm_env

    d = dist_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (d.rank, d.local_rank, d.world_size) == (3, 1, 4)
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert dist_env(env).world_size == 8 and dist_env(env).rank == 5
    export_slurm_env(env)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"


def test_cuda_device_without_cuda_is_a_config_error():
    from engine.devices import pick_device

    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="train.device=cuda but this torch build sees no CUDA GPU"):
        pick_device("cuda")


def test_tokenizer_folder_without_files(tmp_path):
    from engine.tokenizer import load_tokenizer
    from engine.errors import DataError

    with pytest.raises(DataError, match="not a folder with tokenizer files"):
        load_tokenizer(load_config(None, [f"model.tokenizer={tmp_path}"]).model)


def test_lr_schedule_warmup_then_decay_to_floor():
    from engine.config import ScheduleConfig
    from engine.optim import lr_lambda

    f = lr_lambda(10, ScheduleConfig(warmup_steps=2, decay="linear", min_lr_ratio=0.1))
    values = [f(s) for s in range(10)]
    assert values[:2] == [0.5, 1.0] and values[2] < 1.0 and values[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values[1:], values[2:]))
