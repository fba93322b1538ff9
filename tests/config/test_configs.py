"""The config tree and the run identity: every option composes to what its file says, unknown values fail at compose
time naming the choices, the reward modes agree everywhere, and the run key ignores exactly what does not change
results (cosmetic fields, knobs a reward mode does not read)."""

import copy

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from paths import REPO, compose_cfg

from leverplus.analysis.compare import HARD_WEIGHT_COL, MODE_COL, RAW_COL, SOFT_WEIGHT_COL
from leverplus.config.identity import COSMETIC, canonical_config, cosmetic_fields, run_key, to_container
from leverplus.config.reward_modes import REWARD_KNOBS, REWARD_MODE_SPECS, fields_read, needs_infoscores
from leverplus.config.schema import RewardConfig, RewardMode, TrainConfig
from leverplus.config.store import register_configs, sweeps_dir
from leverplus.config.validation import validate_config
from leverplus.data.rewards import REWARD_MODES, compute_reward
from leverplus.errors import LeverPlusInputError
from leverplus.utils import stable_hash

GROUPS = ["data", "model", "reward", "sft", "rce", "grpo", "eval", "tracking"]


def _key(cfg: dict) -> str:
    """The run key's config part (the data fingerprint and code version are the same for every config here)."""
    return stable_hash(canonical_config(cfg))


@pytest.fixture(scope="module")
def default():
    return to_container(compose_cfg([]))


# ---------------------------------------------------------------------------------------------- composition


def _option_values(group: str, option: str) -> dict:
    """What ``conf/<group>/<option>.yaml`` sets (its defaults list dropped), placed at its package."""
    path = REPO / "conf" / group / f"{option}.yaml"
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("defaults", None)
    return values if path.read_text().startswith("# @package _global_") else {group: values}


def _options():
    for group in GROUPS:
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert options, group
        for option in options:
            yield pytest.param(group, option, id=f"{group}={option}")


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_option_of_every_group_composes_to_the_schema_plus_what_its_file_sets(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate_config(cfg)  # every shipped option passes the range checks
    expected = OmegaConf.merge(OmegaConf.structured(TrainConfig), _option_values(group, option))
    assert to_container(cfg) == to_container(expected)


@pytest.mark.parametrize("mode", [m.value for m in RewardMode])
def test_every_reward_mode_composes(mode):
    assert compose_cfg([f"reward.mode={mode}"]).reward.mode.value == mode


@pytest.mark.parametrize("sweep", sorted(p.stem for p in sweeps_dir().glob("[!_]*.yaml")))  # _*.yaml are bases
def test_every_sweep_composes_with_plus_and_names_itself(sweep):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"+sweep={sweep}"], return_hydra_config=True)  # keep the hydra node
    sweeper = cfg.hydra.sweeper
    assert (sweeper.get("sweep_name") or sweeper.get("study_name")) == sweep
    assert cfg.checkpoint_every_epoch is False and cfg.plot_curves is False  # sweeps keep the disk small
    del cfg.hydra
    validate_config(cfg)


def test_sweep_is_not_in_the_primary_defaults():
    defaults = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["defaults"]
    assert not any(isinstance(d, dict) and "sweep" in d for d in defaults)


def test_unknown_enum_value_fails_at_compose_time_naming_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["reward.mode=hard_plus_sfot"])
    text = str(e.value) + str(e.value.__cause__)
    assert all(mode in text for mode in REWARD_MODE_SPECS)


def test_typo_in_a_field_name_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["grpo.lr_typo=1e-5"])


def test_validation_names_the_field():
    with pytest.raises(LeverPlusInputError, match="grpo.lr"):
        validate_config(compose_cfg(["grpo.lr=-1e-5"]))
    with pytest.raises(LeverPlusInputError, match="eval.baselines"):
        validate_config(compose_cfg(["eval.baselines=[oracle]"]))


# ---------------------------------------------------------------------------------------------- reward modes


def test_the_reward_modes_agree_everywhere():
    """Declared list, config enum, registered formulas and the run key's knobs are one list."""
    assert set(REWARD_MODE_SPECS) == {m.value for m in RewardMode} == set(REWARD_MODES)
    mode_specific = {f for f in RewardConfig.__dataclass_fields__} - {"mode", "clip", "diversity_weight"}
    assert set(REWARD_KNOBS) == mode_specific
    assert [m for m in REWARD_MODE_SPECS if needs_infoscores(m)] == ["hybrid_legacy"]
    assert needs_infoscores(RewardMode.hybrid_legacy) and fields_read(RewardMode.legacy) == fields_read("legacy")


def test_the_comparison_columns_are_the_logged_params_of_schema_fields(default):
    """MLflow params are the resolved config flattened to dotted keys: each column names a real field."""
    for col in (MODE_COL, HARD_WEIGHT_COL, SOFT_WEIGHT_COL, RAW_COL):
        section, name = col.removeprefix("params.").split(".")
        assert name in default[section], col
    assert MODE_COL == "params.reward.mode"


CHANGED = dict(hard_weight=3.0, soft_weight=0.8, rel_weight=0.6, reward_alpha=1.1, reward_beta=0.9,
               correctness_mode="pm1", use_logprob=True, info_weight=0.6)
BASE = dict(hard_weight=2.0, soft_weight=0.5, rel_weight=0.3, reward_alpha=0.7, reward_beta=0.4,
            correctness_mode="01", use_logprob=False, info_weight=0.3)
CANDIDATES = [
    {"vqa_correct": 1, "vqa_acc_score": 0.6, "vqa_gt_prob": 0.8, "vqa_rel_score": 0.5, "logprob_score": -2.0},
    {"vqa_correct": 0, "vqa_acc_score": 0.0, "vqa_gt_prob": 0.3, "vqa_rel_score": 0.4, "beam_score": 0.2},
]


def _formula_reads(mode: str, knob: str) -> bool:
    """Whether changing ``knob`` changes the reward of ``mode`` on some candidate (the formula's behaviour)."""
    for knobs in (BASE, {**BASE, "use_logprob": True}):
        for c in CANDIDATES:
            before = compute_reward(c, mode, **knobs, info=0.5, clip=100.0)
            if compute_reward(c, mode, **{**knobs, knob: CHANGED[knob]}, info=0.5, clip=100.0) != before:
                return True
    return False


@pytest.mark.parametrize("mode", sorted(REWARD_MODE_SPECS))
def test_the_run_key_drops_exactly_the_knobs_the_reward_formula_ignores(default, mode):
    base = copy.deepcopy(default)
    base["reward"].update(mode=mode, **BASE)
    for knob in REWARD_KNOBS:
        changed = copy.deepcopy(base)
        changed["reward"][knob] = CHANGED[knob]
        assert (_key(changed) != _key(base)) == _formula_reads(mode, knob), (mode, knob)


@pytest.mark.parametrize("mode", sorted(REWARD_MODE_SPECS))
def test_knobs_of_every_mode_always_change_the_run_key(default, mode):
    for knob, value in (("clip", 4.0), ("diversity_weight", 0.1)):
        a, b = copy.deepcopy(default), copy.deepcopy(default)
        a["reward"]["mode"] = b["reward"]["mode"] = mode
        b["reward"][knob] = value
        assert _key(a) != _key(b), (mode, knob)


# ---------------------------------------------------------------------------------------------- cosmetic fields


def test_the_cosmetic_fields_are_those_the_run_key_always_ignored():
    """The schema's metadata gives exactly the list that was kept by hand (so run keys stay what they were)."""
    by_hand = {"tracking", "progress", "output_dir", "num_threads", "objective", "device", "checkpoint_every_epoch",
               "plot_curves", "tune_malloc", "eval.bootstrap_samples"}
    by_hand |= {"eval.answer_cache_path"}  # added with the answer store: where it lives changes no answer
    by_hand |= {"summary"}  # what a run prints at its end
    assert set(COSMETIC) == set(cosmetic_fields()) == by_hand


COSMETIC_CHANGES = ["tracking.enabled=false", "tracking.experiment=other", "progress=true", "output_dir=/tmp/x",
                    "num_threads=3", "objective=val/offline/top1_acc", "checkpoint_every_epoch=false",
                    "plot_curves=false", "tune_malloc=false", "eval.bootstrap_samples=500",
                    "eval.answer_cache_path=/tmp/answers.sqlite", "summary=always"]
RESULT_CHANGES = ["seed=1", "rce.lr=2e-4", "sft.epochs=3", "model.hidden_dim=64", "eval.pool=train_pool",
                  "data.batch_size=8", "reward.hard_weight=0.5", "grpo.epochs=1", "eval.max_queries=10",
                  "eval.answer_cache=true", "data.diversity_augment=true"]


@pytest.mark.parametrize("override", COSMETIC_CHANGES)
def test_a_cosmetic_field_changes_nothing_in_the_run_key(default, override):
    assert OmegaConf.select(compose_cfg([override]), override.split("=")[0]) != \
        OmegaConf.select(OmegaConf.create(default), override.split("=")[0])  # the override did change the config
    assert run_key(to_container(compose_cfg([override])), "fp") == run_key(default, "fp")


@pytest.mark.parametrize("override", RESULT_CHANGES)
def test_a_field_that_changes_results_changes_the_run_key(default, override):
    assert run_key(to_container(compose_cfg([override])), "fp") != run_key(default, "fp")


def test_the_run_key_of_a_cpu_run_ignores_the_device_and_a_cuda_run_has_its_own(default):
    """CPU keys are what they always were (no device in them); CUDA numbers differ in the last bits, so a CUDA run
    never shares a key with a CPU run, and every CUDA device (cuda, cuda:N) computes the same numbers."""
    def key(device):
        return run_key(to_container(compose_cfg([f"device={device}"])), "fp")

    assert "device" not in canonical_config(default) and key("cpu") == run_key(default, "fp")
    assert key("cuda") != key("cpu") and key("cuda:1") == key("cuda")
    assert canonical_config(to_container(compose_cfg(["device=cuda:2"])))["device"] == "cuda"
    assert key("auto") == (key("cuda") if torch.cuda.is_available() else key("cpu"))
