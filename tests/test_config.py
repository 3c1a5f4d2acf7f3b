"""Run config: defaults → YAML → key=value overrides, typed."""
import json

import pytest

from phoclip_train.config import ConfigError, resolve_config


def test_exponent_floats_are_numbers_not_strings(tmp_path):
    """PyYAML reads `1e-5` (no dot) as a string under YAML 1.1; found when a JSON
    override (json.dumps writes 1e-05) crashed layer_norm on the GPU check."""
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr_head: 3e-4\n  eps: 1.0e-8\n")
    hc = {"layer_norm_eps": 1e-5, "hidden_size": 8}
    cfg = resolve_config(str(f), ["optim.eps=1e-6", "optim.lr_text=2E-5",
                                  "model.overrides=" + json.dumps({"text": {"hf_config": hc}})])
    assert cfg.optim.lr_head == 3e-4 and cfg.optim.eps == 1e-6 and cfg.optim.lr_text == 2e-5
    assert cfg.model.overrides["text"]["hf_config"] == hc
    assert isinstance(cfg.model.overrides["text"]["hf_config"]["layer_norm_eps"], float)
    assert cfg.data.batch_size == 64 and cfg.train.max_steps == 1000  # untouched defaults


@pytest.mark.parametrize("override, message", [
    ("optim.eps=small", "must be a number"),
    ("data.batch_size=1.5", "must be an integer"),
    ("train.resampled=yes", "unknown config key"),
    ("optim.lr=1e-4", "unknown config key"),
    ("train.max_steps", "not key=value"),
    ("run_dir=null", "run_dir must be text"),  # was set to None, to fail later as a path
    ("optim.betas=0.9", "must be a list"),
    ("train.eval_sets=[a]", "must be a mapping"),
    ("data=3", "data is a section"),
])
def test_bad_overrides_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, [override])


@pytest.mark.parametrize("name", ["phobert-large-rn50", "tiny-debug", "demo"])
def test_every_run_config_resolves(name):
    """The shipped YAML files load as written (YAML 1.1 reads `off` as a boolean: the
    choice fields take it back as the word)."""
    cfg = resolve_config(f"launch/configs/{name}.yaml", ["data.train_shards=x.tar"])
    cfg.validate(world_size=1)
    assert cfg.train.compile == "off" and cfg.data.resize_on == "worker"
    assert resolve_config(None, ["train.compile=off", "train.channels_last=no"]).train.channels_last == "false"


def test_yaml_syntax_errors_are_one_line_naming_the_key_or_file_and_how_to_quote(tmp_path, shapes_shards):
    """An unquoted brace pattern inside train.eval_sets={...} (easy to write: the shell
    examples are full of them) is one line saying how to quote it, not a yaml ParserError traceback."""
    from phoclip_train.config import ConfigError, resolve_config

    with pytest.raises(ConfigError) as e:
        resolve_config(None, ["train.eval_sets={a: s/val-{000000..000001}.tar}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("override train.eval_sets=") and "column 11" in msg
    assert "needs quotes" in msg
    cfg = resolve_config(None, ['train.eval_sets={a: "s/val-{000000..000001}.tar"}', "train.eval_sets.b=s/x"])
    assert cfg.train.eval_sets == {"a": "s/val-{000000..000001}.tar", "b": "s/x"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.yaml: not valid YAML at line 3"):
        resolve_config(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of config groups"):
        resolve_config(str(bad))
    # the docs' examples, as written there, resolve (a shard folder needs no quotes; a
    # brace pattern is quoted inside the YAML)
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    for page in ("README.md", "docs/evaluation.md"):
        examples = re.findall(r"(train\.eval_sets='[^']*')", (root / page).read_text())
        assert examples, page
        for example in examples:
            key, value = example.split("=", 1)
            assert resolve_config(None, [f"{key}={value.strip(chr(39))}"]).train.eval_sets, (page, example)


def test_a_deepspeed_precision_mismatch_is_refused_before_anything_is_built(tmp_path):
    """tiny-debug (fp32) with a shipped bf16 JSON is refused from the files alone, before
    the ~2 minutes of building the model and DeepSpeed's op, pointing at the fp32 JSON, which runs."""
    import json
    import time

    from conftest import ROOT, train_main
    from phoclip_train.config import resolve_config
    from phoclip_train.ds_config import decide_ds_precision

    t0 = time.time()
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", "--deepspeed_config",
                          "launch/deepspeed/zero2_bf16.json", "data.train_shards=/nonexistent/x.tar",
                          f"run_dir={tmp_path / 'run'}", "train.precision=fp32"])
    assert rc == 2 and time.time() - t0 < 10
    assert "zero2_bf16.json trains in bf16 but train.precision=fp32" in log and "zero2_fp32.json" in log, log
    assert not (tmp_path / "run").exists()
    cfg = resolve_config(str(ROOT / "launch/configs/tiny-debug.yaml"), ["data.train_shards=x"])
    assert decide_ds_precision(str(ROOT / "launch/deepspeed/zero2_fp32.json"), cfg.train.precision) == "fp32"
    assert decide_ds_precision(str(ROOT / "launch/deepspeed/zero2_bf16.json"), "auto") == "bf16"
    tiny = json.loads((ROOT / "launch/deepspeed/zero2_fp32.json").read_text())
    bf16 = json.loads((ROOT / "launch/deepspeed/zero2_bf16.json").read_text())
    assert tiny == {k: v for k, v in bf16.items() if k != "torch_autocast"}  # the same ZeRO-2, in fp32


def test_validate_only_checks_and_the_accumulation_is_derived_apart():
    """validate() only checks (it sets no field, train.accum_steps included), and the
    accumulation a global batch implies is asked for (accum_steps_for) by whoever builds the run."""
    import copy

    cfg = resolve_config(None, ["data.train_shards=x", "data.batch_size=4", "data.global_batch_size=32"])
    before = copy.deepcopy(cfg)
    cfg.validate(world_size=2)
    assert cfg == before and cfg.train.accum_steps == 1
    assert cfg.accum_steps_for(2) == 4 and cfg.accum_steps_for(8) == 1 and cfg.accum_steps_for(1) == 8
    assert cfg.accum_steps_for(3) == 1  # 32 over 3 x 4 does not divide: validate refuses it
    with pytest.raises(ConfigError, match="not a multiple of data.batch_size x ranks = 4 x 3"):
        cfg.validate(world_size=3)
    plain = resolve_config(None, ["train.accum_steps=3"])
    assert plain.accum_steps_for(4) == 3


def test_resolution_records_where_each_value_came_from(tmp_path):
    from phoclip_train.config import describe_config, field_docs, RunConfig, TrainConfig

    f = tmp_path / "c.yaml"
    f.write_text("train:\n  seed: 7\n")
    sources: dict = {}
    cfg = resolve_config(str(f), ["train.max_steps=5", "model.overrides.vision={pretrained: false}"], sources)
    assert sources == {"train.seed": f"YAML file {f}", "train.max_steps": "override",
                       "model.overrides.vision": "override"}
    text = describe_config(cfg, sources)
    assert f"train.seed = 7    (YAML file {f}; default 0)" in text
    assert "model.overrides = {vision: {pretrained: false}}    (override; default {})" in text
    assert "train.log_every = 10    (default)" in text
    assert field_docs(TrainConfig)["max_steps"] == "Optimizer steps of the whole run (the schedule's length)."
    assert set(field_docs(RunConfig)) == {"run_dir", "resume", "model", "data", "optim", "train"}


def test_values_are_converted_only_where_nothing_is_lost(tmp_path):
    """Each value is checked against its field's type (pydantic, strict): an int where a
    float is declared and a list where a tuple is are taken; text for a number, a fraction
    for an integer, a number for a boolean are refused, naming the key."""
    cfg = resolve_config(None, ["data.batch_size=3", "optim.lr_head=1", "optim.betas=[0.9, 0.95]",
                                "data.resampled=no", "run_dir=0123", "train.compile=off"])
    assert cfg.data.batch_size == 3 and cfg.optim.lr_head == 1.0 and isinstance(cfg.optim.lr_head, float)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.data.resampled is False and cfg.train.compile == "off"
    assert cfg.run_dir == "0123"  # a plain text field takes the word as typed (YAML 1.1 reads 0123 as 83)
    for override, message in [("data.batch_size=3.5", "data.batch_size must be an integer, not '3.5'"),
                              ("data.batch_size=true", "data.batch_size must be an integer, not 'true'"),
                              ("optim.lr_head=true", "optim.lr_head must be a number, not 'true'"),
                              ("data.resampled=1", "data.resampled must be true or false, not '1'"),
                              ("data.val_shards=7", "data.val_shards must be text, not '7'"),
                              ("train.precision=bf32", "train.precision='bf32': choose bf16, fp16, fp32 or auto")]:
        with pytest.raises(ConfigError) as e:
            resolve_config(None, [override])
        assert str(e.value) == message
    f = tmp_path / "c.yaml"
    f.write_text('data:\n  batch_size: "3"\n')
    with pytest.raises(ConfigError, match=r"^data.batch_size must be an integer, not '3'$"):
        resolve_config(str(f))
    cfg = resolve_config(None, ["data.train_shards=x"])
    cfg.train.engine = "horovod"  # set in code: validate checks every field's type again
    with pytest.raises(ConfigError, match="choose ddp or deepspeed"):
        cfg.validate()


def _laughs(levels: int = 9) -> str:
    """YAML whose last anchor stands for 10**levels strings ("billion laughs")."""
    lines = ["    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "model:\n  overrides:\n" + "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path):
    import time

    f = tmp_path / "laughs.yaml"
    f.write_text(_laughs())
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        resolve_config(str(f))
    assert time.perf_counter() - t0 < 1
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config file {f}: an alias (*l0) is not accepted"), msg
    assert "line 4, column" in msg
    value = "{a: &a [x, x], b: [*a, *a]}"
    with pytest.raises(ConfigError, match=r"^override model.overrides=.*: an alias \(\*a\) is not accepted"):
        resolve_config(None, [f"model.overrides={value}"])


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_a_config_nested_too_deep_is_one_line_not_a_recursion_error(tmp_path, opening, closing):
    deep = opening * 20_000 + "1" + closing * 20_000
    f = tmp_path / "deep.yaml"
    f.write_text(f"model:\n  overrides: {{vision: {deep}}}\n")
    for config, overrides, where in [(str(f), [], f"config file {f}"),
                                     (None, [f"model.overrides.vision={deep}"], "override model.overrides.vision=")]:
        with pytest.raises(ConfigError) as e:
            resolve_config(config, overrides)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(where) and "nested deeper than 64 levels" in msg, msg[-300:]
        assert len(msg) < 500
    ok = "[" * 60 + "1" + "]" * 60  # deep enough for any real architecture override
    assert resolve_config(None, [f"model.overrides.vision={ok}"]).model.overrides["vision"]


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=100000000000000000000", "data.batch_size must be at most 1,048,576, not 100,000,000,000,000,000,000"),
    ("data.image_size=100000000", "data.image_size must be at most 2,048, not 100,000,000"),
    ("data.workers=1000000", "data.workers must be at most 256, not 1,000,000"),
    ("data.shuffle_buffer=1000000000000", "data.shuffle_buffer must be at most"),
    ("data.length_buckets=1000000000", "data.length_buckets must be at most"),
    ("train.accum_steps=1000000000", "train.accum_steps must be at most"),
])
def test_sizes_past_their_caps_are_refused_naming_the_key(override, message):
    """Whole numbers that large passed validation: the batch and image sizes died in a
    DataLoader worker, a million workers were forked."""
    cfg = resolve_config(None, ["data.train_shards=x.tar", override])
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert str(e.value) == message or (message in str(e.value) and "\n" not in str(e.value)), str(e.value)


def test_the_image_size_cap_is_the_model_configs():
    from phoclip.models.pretrained import MAX_IMAGE_SIZE
    from phoclip_train.config import SIZE_CAPS

    assert SIZE_CAPS["data.image_size"] == MAX_IMAGE_SIZE
    cfg = resolve_config(None, ["data.train_shards=x.tar", f"data.image_size={MAX_IMAGE_SIZE}"])
    cfg.validate()
