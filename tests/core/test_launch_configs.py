"""The Accelerate launch configs in recipes/accelerate/, read by Accelerate's own launcher code (no GPU needed):
every key is one Accelerate knows, and the DeepSpeed file turns into the intended plugin settings."""
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
EXPECTED = {"cpu": DistributedType.NO, "cpu_2proc": DistributedType.MULTI_GPU,
            "multi_gpu": DistributedType.MULTI_GPU,
            "deepspeed_zero2": DistributedType.DEEPSPEED}


def launch_args(name: str):
    """What `accelerate launch --config_file <name>.yaml` makes of the file, and the file as Accelerate reads it."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_config_is_listed():
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_known_keys(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # rejects unknown top-level keys
    assert config.distributed_type == EXPECTED[name]
    # the launcher copies nested keys onto its arguments without checking them: a typo would be ignored silently
    options = vars(launch_command_parser().parse_args(["script.py"]))
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section) or {}:
            assert key in options, f"{name}.yaml: {section}.{key} is not an accelerate launch option"
    args, _ = launch_args(name)
    assert args.num_processes == (1 if name == "cpu" else 2)


def test_deepspeed_config_is_zero_stage_2():
    args, defaults = launch_args("deepspeed_zero2")
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 2 and not plugin.zero3_init_flag
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "none"
