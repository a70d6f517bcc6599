"""Config tree: YAML + dotlist overrides through OmegaConf, safe YAML, errors that name the key."""

from __future__ import annotations

import pytest

from ltm.config import ConfigError, from_dict, load_config, packaged_configs, save_config, to_dict


def test_packaged_configs_load():
    assert {"paper", "tiny-cpu"} <= set(packaged_configs())
    paper = load_config("paper")
    assert paper.model.backbone == "legacy_xception" and paper.train.lr == 0.01 and paper.train.batch_size == 32
    assert paper.model.mask_ratio == 0.25 and paper.model.div_weight == 0.1 and paper.train.lr_gamma == 0.9
    tiny = load_config("tiny-cpu")
    assert tiny.model.backbone == "tf_efficientnet_lite0" and tiny.data.image_size == 112
    assert paper.model.pretrained == tiny.model.pretrained == "imagenet"  # Sec. 4.1: ImageNet-initialised
    assert tiny.model.mask_strategy == "high"  # inherited from paper through `base`


def test_yaml_and_overrides_round_trip(tmp_path):
    cfg = load_config("tiny-cpu", ["train.lr=0.5", "model.mask_strategy=low", "data.train=[{path: a, weight: 3}]"])
    assert cfg.train.lr == 0.5 and cfg.model.mask_strategy == "low"
    assert cfg.data.train[0].path == "a" and cfg.data.train[0].weight == 3
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_each_load_starts_from_the_defaults():
    """Every load merges into its own copy of the defaults: what one load's file, overrides or stored config set never
    shows in the next."""
    plain = to_dict(load_config(None))
    load_config("tiny-cpu", ["train.lr=0.5", "model.vit.dim=48", "data.train=[{path: a, weight: 3}]"])
    stored = to_dict(load_config("paper", ["train.seed=7"]))
    del stored["train"]["seed"]
    assert from_dict(stored).train.seed == plain["train"]["seed"]
    with pytest.raises(ConfigError):
        load_config("tiny-cpu", ["train.batch_size=8", "train.epochs=abc"])  # fails half-way through its overrides
    assert to_dict(load_config(None)) == plain


@pytest.mark.parametrize(
    "override,key",
    [("train.lrr=1", "lrr"), ("model.mask_strategy=middle", "model.mask_strategy"), ("train.epochs=abc", "epochs"),
     ("model.vit.heads=5", "model.vit.heads"), ("data.train=[{path: a, weight: -1}]", "data.train[0].weight")],
)
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config("paper", [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: paper\nmodel:\n  maskratio: 0.3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*maskratio"):
        load_config(path)


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(path)


def test_missing_config_names_it():
    with pytest.raises(ConfigError, match="no-such-config"):
        load_config("no-such-config")


def test_a_base_chain_merges_base_most_first_and_a_rewritten_file_is_read_again(tmp_path):
    """`base:` chains of files next to each other: the nearer file wins key by key, lists are replaced whole. A file
    rewritten between two loads (same path, same size) is read again."""
    (tmp_path / "a.yaml").write_text("base: tiny-cpu\ntrain: {lr: 0.5, betas: [0.1, 0.2]}\nmodel: {vit: {dim: 48}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {lr: 0.25}\nmodel: {vit: {heads: 3}}\n")
    b = load_config(tmp_path / "b.yaml")
    assert (b.train.lr, b.train.betas, b.model.vit.dim, b.model.vit.heads) == (0.25, [0.1, 0.2], 48, 3)
    assert b.model.backbone == "tf_efficientnet_lite0"  # from tiny-cpu, two files down
    (tmp_path / "a.yaml").write_text("base: tiny-cpu\ntrain: {lr: 0.5, betas: [0.3, 0.4]}\nmodel: {vit: {dim: 48}}\n")
    assert load_config(tmp_path / "b.yaml").train.betas == [0.3, 0.4]
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "b.yaml")
