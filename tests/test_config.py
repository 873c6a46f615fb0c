import glob
import os

import pytest

from engine.config import ConfigError, deepspeed_config, grad_accum_steps, load_config

from .helpers import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_configs():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    for need in ("tiny/mntp.yaml", "tiny/simcse.yaml", "tiny/supervised.yaml", "smollm2-135m/mntp.yaml",
                 "smollm2-135m/simcse.yaml", "smollm2-135m/supervised.yaml", "mistral-7b/mntp.yaml",
                 "llama3-8b/mntp.yaml", "llama2-7b/mntp.yaml"):
        assert need in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_loads_and_takes_the_standard_overrides(path):
    cfg = load_config(path, ["max_steps=20", "data=some/file.txt", "output_dir=/tmp/x"])
    assert cfg.max_steps == 20 and cfg.data == ["some/file.txt"] and cfg.output_dir == "/tmp/x"
    ds = deepspeed_config(cfg, world_size=1, use_bf16=True)
    assert "auto" not in repr(ds)
    assert ds["train_batch_size"] == cfg.batch_size
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == cfg.batch_size


def test_paper_settings():
    m = load_config(os.path.join(ROOT, "configs/mistral-7b/mntp.yaml"))
    assert (m.mntp.mask_prob, m.mntp.scheme, m.max_steps, m.batch_size, m.max_seq_len) == (0.8, "all", 1000, 32, 512)
    for name in ("llama3-8b", "llama2-7b"):
        c = load_config(os.path.join(ROOT, f"configs/{name}/mntp.yaml"))
        assert (c.mntp.mask_prob, c.mntp.scheme) == (0.2, "bert")
        assert c.data == ["hf:wikitext:wikitext-103-raw-v1:train"]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step'.*did you mean 'max_steps'"):
        load_config(None, ["model.name_or_path=x", "max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rr'.*'lora.r'"):
        load_config(None, ["model.name_or_path=x", "lora.rr=3"])
    # a section's key at the top level names the section's key (difflib found no close top-level name for them)
    for key, want in (("temperature", "contrastive.temperature"), ("r", "lora.r"), ("mask_prob", "mntp.mask_prob")):
        with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; did you mean '{want}'\?"):
            load_config(None, ["model.name_or_path=x", f"{key}=1"])
    from engine.config import TrainConfig, _build  # a file's key at the wrong level: the same

    with pytest.raises(ConfigError, match=r"unknown config key 'temperature'; did you mean 'contrastive.temperature'"):
        _build(TrainConfig, {"model": {"name_or_path": "x"}, "temperature": 0.1})


@pytest.mark.parametrize("key", ["1", "null", "on", "no"])
def test_a_yaml_key_that_is_no_name_is_a_config_error(tmp_path, key):
    """YAML reads `1:`, `null:` and 1.1's `on:` / `no:` as a number, None or a bool: a TypeError traceback in the
    key suggestions, now the one-line config error."""
    p = tmp_path / "c.yaml"
    p.write_text(f"stage: mntp\nmodel: {{name_or_path: x}}\n{key}: 3\n")
    with pytest.raises(ConfigError, match=r"is not a name"):
        load_config(str(p))


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: mntp\nmodel: {name_or_path: x, atention: torch}\n")
    with pytest.raises(ConfigError, match=r"model.atention.*model.attention"):
        load_config(str(p))


def test_random_init_reads_exponent_numbers_as_numbers(tmp_path):
    # PyYAML (YAML 1.1) leaves 1e-6 and 1.0e5 strings; transformers' configs then refuse them. The untyped
    # mapping's values are read as JSON / YAML 1.2 would; keys, words and quoted dotted numbers stay as given.
    import json

    spec = {"model_type": "llama", "rms_norm_eps": 1e-06, "rope_theta": 1.0e5, "hidden_act": "silu",
            "rope_scaling": {"factor": 2e0}}
    cfg = load_config(None, ["model.name_or_path=x", f"model.random_init={json.dumps(spec)}"])
    assert cfg.model.random_init == spec
    p = tmp_path / "c.yaml"
    p.write_text("stage: mntp\nmodel:\n  name_or_path: x\n  random_init: {model_type: llama, rms_norm_eps: 1e-6,"
                 " 2e5: a, note: '1.5', act: 1e5x}\n")
    got = load_config(str(p)).model.random_init
    assert got == {"model_type": "llama", "rms_norm_eps": 1e-6, "2e5": "a", "note": "1.5", "act": "1e5x"}
    assert isinstance(got["rms_norm_eps"], float)
    from engine.modeling import architecture_config

    arch, _ = architecture_config(load_config(None, ["model.name_or_path=x", "model.random_init=" + json.dumps(
        {"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "num_attention_heads": 2, "rms_norm_eps": 1e-06})]
    ).model)
    assert arch.rms_norm_eps == 1e-6


def test_bad_values():
    with pytest.raises(ConfigError, match="expects an integer"):
        load_config(None, ["model.name_or_path=x", "max_steps=abc"])
    with pytest.raises(ConfigError, match="stage must be one of"):
        load_config(None, ["model.name_or_path=x", "stage=pretrain"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(None, [])


def test_the_config_takes_every_chat_wrap_and_pooling_mode_the_code_has(monkeypatch):
    """contrastive.chat is checked against the wraps' own table (docs/adding-a-model-family.md: a family adds its
    wrap there alone); a copy of the names in the config refused a wrap the encoder took."""
    import engine.config as C
    from engine.encoding import CHAT_SETTINGS
    from engine.pooling import POOLING_MODES

    assert C.CHAT_SETTINGS is CHAT_SETTINGS
    for name in CHAT_SETTINGS:
        assert load_config(None, ["model.name_or_path=x", f"contrastive.chat={name}"]).contrastive.chat == name
    monkeypatch.setattr(C, "CHAT_SETTINGS", (*CHAT_SETTINGS, "newfamily"))
    assert load_config(None, ["model.name_or_path=x", "contrastive.chat=newfamily"]).contrastive.chat == "newfamily"
    with pytest.raises(ConfigError, match="contrastive.chat must be one of"):
        load_config(None, ["model.name_or_path=x", "contrastive.chat=unknown"])
    for mode in POOLING_MODES:
        assert load_config(None, ["model.name_or_path=x", f"contrastive.pooling={mode}"]).contrastive.pooling == mode
    with pytest.raises(ConfigError, match="contrastive.pooling must be one of"):
        load_config(None, ["model.name_or_path=x", "contrastive.pooling=max"])


def test_batch_not_divisible_by_world():
    cfg = load_config(None, ["model.name_or_path=x", "batch_size=32", "micro_batch_size=4"])
    assert grad_accum_steps(cfg, 2) == 4
    with pytest.raises(ConfigError, match=r"batch_size 32 is not divisible by micro_batch_size 4 x world size 3 = "
                       r"12: 3 ranks cannot share a batch of 32 \(rank counts that can, up to 6: 1, 2, 4\)"):
        grad_accum_steps(cfg, 3)
    # the error said "choose a batch_size that is a multiple of 510" for the paper's 512 on 6 GPUs; with a world size
    # that divides the batch it names the micro-batch sizes that keep it
    with pytest.raises(ConfigError, match=r"to keep batch_size 32, micro_batch_size must divide 16 \(batch_size / "
                       r"world size\): one of 1, 2, 4, 8, 16$"):
        grad_accum_steps(load_config(None, ["model.name_or_path=x", "batch_size=32", "micro_batch_size=3"]), 2)
    # the README's "On N GPUs" recipe: N in 1, 2, 4, 8 keeps the paper's batches; 3, 5, 6, 7 cannot
    for stage, batch in (("supervised", 512), ("simcse", 128)):
        for n in range(1, 9):
            cfg = load_config(os.path.join(ROOT, f"configs/mistral-7b/{stage}.yaml"), [f"micro_batch_size={batch // n}"])
            if n in (1, 2, 4, 8):
                assert grad_accum_steps(cfg, n) == 1
            else:
                with pytest.raises(ConfigError, match=f"{n} ranks cannot share a batch of {batch}"):
                    grad_accum_steps(cfg, n)


def test_list_override_and_nested():
    cfg = load_config(None, ["model.name_or_path=x", "data=a.txt,b.txt", "lora.target_modules=[q_proj, v_proj]",
                             "model.adapters=one"])
    assert cfg.data == ["a.txt", "b.txt"] and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.adapters == ["one"]


def test_a_file_and_an_override_read_a_value_alike(tmp_path):
    # the same text means the same in the YAML file as on the command line (helper-97's three traps)
    p = tmp_path / "c.yaml"
    p.write_text("stage: mntp\nmodel:\n  name_or_path: x\n  random_init: {model_type: llama, hidden_size: 32, "
                 "num_hidden_layers: 2}\ndata: a.txt, b.txt\nprogress_bar: 0\nadam_betas: 0.9,0.98\n")
    from_file = load_config(str(p))
    from_cli = load_config(None, ["model.name_or_path=x", "data=a.txt, b.txt", "progress_bar=0",
                                  "adam_betas=0.9,0.98",
                                  "model.random_init={model_type: llama, hidden_size: 32, num_hidden_layers: 2}"])
    for cfg in (from_file, from_cli):
        assert cfg.data == ["a.txt", "b.txt"] and cfg.progress_bar is False and cfg.adam_betas == [0.9, 0.98]
    assert load_config(str(p), ["progress_bar=1"]).progress_bar is True
    # a mapping override merges into the file's mapping, as a section's does: the other keys stay
    merged = load_config(str(p), ["model.random_init={num_hidden_layers: 4}"]).model.random_init
    assert merged == {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4}
    other = load_config(str(p), ["model.random_init={model_type: gpt2, n_embd: 16}"]).model.random_init
    assert other == {"model_type": "gpt2", "n_embd": 16}  # another family's spec replaces the file's
    assert load_config(str(p), ["model.random_init=null", "model.name_or_path=x"]).model.random_init is None
    p.write_text("stage: mntp\nmodel:\n  name_or_path: x\ndata:\n  - 'a,b.txt'\nprogress_bar: 2\n")
    with pytest.raises(ConfigError, match="expects true/false, got 2"):  # only 0 and 1 are booleans
        load_config(str(p))
    assert load_config(str(p), ["progress_bar=true"]).data == ["a,b.txt"]  # a YAML list keeps a comma


def test_overrides_are_read_by_the_keys_type_not_by_yaml_guesses():
    e5 = "Given a web search query, retrieve relevant passages that answer the query: "
    cfg = load_config(None, ["model.name_or_path=x", f"contrastive.instruction={e5}", "mntp.mask_token=[MASK]",
                             "output_dir=no", "seed=010", "lora.target_modules=q_proj,v_proj", "adam_betas=0.9,0.98",
                             "contrastive.angle_weights=1,1,2", "model.tokenizer=null", "progress_bar=off"])
    assert cfg.contrastive.instruction == e5 and cfg.mntp.mask_token == "[MASK]" and cfg.output_dir == "no"
    assert cfg.seed == 10 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.adam_betas == [0.9, 0.98]
    assert cfg.contrastive.angle_weights == [1.0, 1.0, 2.0] and cfg.model.tokenizer is None
    assert cfg.progress_bar is False
    assert load_config(None, ["model.name_or_path=x", "mntp.mask_token='*'"]).mntp.mask_token == "*"
    for bad, msg in (("learning_rate=true", "expects a number"), ("max_steps=1:30", "expects an integer"),
                     ("max_steps=nan", "expects an integer"), ("max_samples=inf", "expects an integer"),
                     ("seed=1e400", "expects an integer"), ("seed=18446744073709551616", r"seed must be >= 0 and < 2\*\*63")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, ["model.name_or_path=x", bad])


def test_yaml_file_values_that_yaml_reads_as_another_type_are_refused(tmp_path):
    for text, msg in (("mntp: {mask_token: no}", "expects a string, got the boolean False: quote it"),
                      ("lora: {alpha: .inf}", "expects an integer"), ("learning_rate: true", "expects a number")):
        path = tmp_path / "c.yaml"
        path.write_text(f"model: {{name_or_path: x}}\n{text}\n")
        with pytest.raises(ConfigError, match=msg):
            load_config(str(path))
    path.write_text("model: {name_or_path: x, gradient_checkpointing: true}\n")  # the documented alias stays
    assert load_config(str(path)).model.gradient_checkpointing == "full"


def test_a_section_override_keeps_the_files_other_keys_of_that_section():
    path = os.path.join(ROOT, "configs/mistral-7b/supervised.yaml")
    base = load_config(path)
    cfg = load_config(path, ["contrastive={max_len: 256}"])
    assert cfg.contrastive.max_len == 256 and base.contrastive.max_len != 256
    assert cfg.contrastive.grad_cache_chunk == base.contrastive.grad_cache_chunk == 64
    assert cfg.contrastive.instruction == base.contrastive.instruction


def test_lr_decay_steps_sets_the_schedule_horizon():
    from engine.optim import lr_lambda

    base = load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"), ["max_steps=100", "warmup_steps=0"])
    f = lr_lambda(base)
    assert f(50) == pytest.approx(0.5) and f(100) == 0.0  # default: decay to 0 at max_steps, as before
    longer = load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"),
                         ["max_steps=100", "warmup_steps=0", "lr_decay_steps=400"])
    g = lr_lambda(longer)
    assert g(50) == pytest.approx(1 - 50 / 400) and g(100) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="lr_decay_steps must be >= 0"):
        load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"), ["lr_decay_steps=-1"])
    from engine.checkpoint import fingerprint

    assert "lr_decay_steps" not in fingerprint(base) and fingerprint(longer)["lr_decay_steps"] == 400


def test_lr_decay_epochs_resolves_from_the_data():
    """llm2vec's HF Trainer decays over num_train_epochs epochs of its data: lr_decay_epochs 3 with 250 global
    batches an epoch reaches 0 at step 750, whatever max_steps is."""
    from engine.checkpoint import fingerprint
    from engine.optim import decay_horizon, lr_lambda

    cfg = load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"),
                      ["max_steps=100", "warmup_steps=50", "lr_decay_epochs=3"])
    assert decay_horizon(cfg, 250) == 750 and decay_horizon(cfg, 333.0) == 999
    f = lr_lambda(cfg, 250)
    assert f(0) == pytest.approx(1 / 50) and f(50) == 1.0 and f(400) == pytest.approx(1 - 350 / 700) and f(750) == 0
    assert fingerprint(cfg)["lr_decay_epochs"] == 3
    with pytest.raises(ValueError, match="steps per epoch"):
        lr_lambda(cfg)
    with pytest.raises(ConfigError, match="not both"):
        load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"), ["lr_decay_epochs=3", "lr_decay_steps=10"])
    with pytest.raises(ConfigError, match="lr_decay_epochs must be >= 0"):
        load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"), ["lr_decay_epochs=-1"])


@pytest.mark.parametrize("model", ["llama2-7b", "mistral-7b", "llama3-8b", "llama3.1-8b", "sheared-llama-1.3b",
                                   "qwen2-0.5b"])
def test_recipe_configs_follow_llm2vec(model):
    from engine.optim import lr_lambda

    m = load_config(os.path.join(ROOT, f"configs/{model}/mntp.yaml"))
    assert (m.learning_rate, m.max_steps, m.max_seq_len, m.lora.r, m.lora.alpha, m.mntp.mask_token) == \
        (5e-5, 1000, 512, 16, 32, "_")
    assert (m.mntp.mask_prob, m.mntp.scheme) == ((0.8, "all") if model == "mistral-7b" else (0.2, "bert"))
    # llm2vec's HF Trainer decays over 3 epochs and stops at step 1000: the LR there is still near the peak.
    # The horizon is counted in epochs of the data read; wikitext-103 gives about 8,000 steps of 32 x 512 tokens
    assert m.lr_decay_epochs == 3 and not m.lr_decay_steps and 0.9 < lr_lambda(m, 8000)(1000) < 1.0
    s = load_config(os.path.join(ROOT, f"configs/{model}/simcse.yaml"))
    assert (s.learning_rate, s.batch_size, s.contrastive.temperature, s.model.attention_dropout,
            s.contrastive.max_len, s.max_steps) == (3e-5, 128, 0.05, 0.3, 128, 1000)
    u = load_config(os.path.join(ROOT, f"configs/{model}/supervised.yaml"))
    assert (u.learning_rate, u.batch_size, u.warmup_steps, u.contrastive.max_len, u.contrastive.temperature,
            u.max_steps) == (2e-4, 512, 300, 512, 0.02, 1000)
    assert u.lr_decay_epochs == 3 and s.lr_decay_steps == 23439  # E5 (~1.5M examples): ~2,900 steps of 512
    for c, per_epoch in ((s, None), (u, 2900)):
        assert c.model.adapters == [f"outputs/{model}-mntp/adapter"] and 0.85 < lr_lambda(c, per_epoch)(1000) < 1.0


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.endswith("/supervised.yaml") and "/tiny/" not in p and
                                  "/smollm2-135m/" not in p], ids=lambda p: os.path.relpath(p, ROOT))
def test_recipe_supervised_configs_cache_gradients_where_micro_is_below_the_batch(path):
    cfg = load_config(path)
    assert cfg.micro_batch_size < cfg.batch_size and cfg.contrastive.grad_cache_chunk > 0


def test_fewer_negatives_than_the_global_batch_is_a_loud_warning():
    from engine.config import negatives_warning

    path = os.path.join(ROOT, "configs/mistral-7b/supervised.yaml")
    cfg = load_config(path)
    assert negatives_warning(cfg, 8) is None  # 64 x 8 ranks = 512 in one loss
    w = negatives_warning(cfg, 1)  # one GPU: 8 accumulation steps of 64
    assert "in-batch negatives of 64 examples, not the global batch of 512" in w and "micro_batch_size=512" in w
    assert negatives_warning(load_config(path, ["micro_batch_size=512"]), 1) is None
    w = negatives_warning(load_config(path, ["contrastive.gather_across_ranks=false"]), 8)
    # the advice was micro_batch_size=64, which it already is: with no accumulation, gathering is the fix
    assert "of 64 examples" in w and "gather_across_ranks off" in w and "micro_batch_size=" not in w
    assert w.endswith("For the whole batch set contrastive.gather_across_ranks=true")
    w = negatives_warning(load_config(path, ["contrastive.gather_across_ranks=false", "micro_batch_size=32"]), 8)
    assert "set contrastive.gather_across_ranks=true and set micro_batch_size=64 with gradient caching" in w
    assert negatives_warning(load_config(os.path.join(ROOT, "configs/mistral-7b/mntp.yaml")), 1) is None


def test_simcse_without_any_dropout_is_warned_about():
    """SimCSE's positive is the same sentence under another dropout draw: with no dropout at all the pair is
    identical. Every shipped SimCSE config has attention dropout; turning both off is warned about."""
    import glob

    from engine.config import dropout_warning

    for path in glob.glob(os.path.join(ROOT, "configs", "*", "simcse.yaml")):
        assert dropout_warning(load_config(path)) is None, path
    path = os.path.join(ROOT, "configs/tiny/simcse.yaml")
    assert "SimCSE with no dropout" in dropout_warning(load_config(path, ["model.attention_dropout=0", "lora.dropout=0"]))
    assert "SimCSE with no dropout" in dropout_warning(load_config(path, ["model.attention_dropout=0",
                                                                          "lora.enabled=false"]))
    assert dropout_warning(load_config(path, ["model.attention_dropout=0"])) is None  # LoRA dropout 0.05 is some
    assert dropout_warning(load_config(os.path.join(ROOT, "configs/tiny/supervised.yaml"),
                                       ["model.attention_dropout=0", "lora.dropout=0"])) is None


def test_a_config_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A config.yaml the process may not read (permission denied; tests run as root, so open is made to refuse) or
    that fails with an I/O error is a ConfigError naming the file and the reason, which train.py --config says in
    one line (exit 2), not a traceback."""
    import errno

    import engine.config
    from engine.train import main

    path = tmp_path / "run.yaml"
    path.write_text("stage: mntp\n")
    real_open = open

    def refusing_open(file, *a, **k):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *a, **k)

    monkeypatch.setattr(engine.config, "open", refusing_open, raising=False)
    with pytest.raises(ConfigError, match=f"config file {path} cannot be read: Permission denied$"):
        load_config(str(path))
    assert main(["--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"config error: config file {path} cannot be read: Permission denied"], err

    def io_error(file, *a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(engine.config, "open", io_error, raising=False)
    with pytest.raises(ConfigError, match="cannot be read: Input/output error"):
        load_config(str(path))


def test_a_key_given_twice_is_refused_in_a_file_and_in_an_override(tmp_path):
    """PyYAML keeps the last of a repeated key silently: a second `lora:` block at the bottom of a recipe dropped
    the first block's keys back to their defaults (r 16 for the file's r 4), with exit 0."""
    path = tmp_path / "dup.yaml"
    path.write_text("model: {name_or_path: x}\nlora: {r: 4}\nlora: {alpha: 8}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'lora' appears twice in one mapping \(lines 2 and 3\)"):
        load_config(str(path))
    path.write_text("model: {name_or_path: x}\nmax_steps: 10\nlora:\n  r: 4\n  r: 8\n")
    with pytest.raises(ConfigError, match=r"key 'r' appears twice in one mapping \(lines 4 and 5\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"override lora='\{r: 4, r: 5\}': key 'r' appears twice"):
        load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"), ["lora={r: 4, r: 5}"])
    # YAML merge keys are not repeats: an explicit key overrides a merged one
    from engine.config import safe_load_unique

    raw = safe_load_unique("a: &b {r: 4}\nc: {<<: *b, r: 8}\n")
    assert raw == {"a": {"r": 4}, "c": {"r": 8}}


def test_an_override_nested_too_deeply_is_one_config_error():
    with pytest.raises(ConfigError, match="override lora.target_modules: the value is nested too deeply"):
        load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"), ["lora.target_modules=" + "[" * 5000])


def test_a_tilde_in_a_yaml_path_is_the_users_home(tmp_path, monkeypatch):
    """The shell expands ~ in a command-line override, not in a YAML file: `output_dir: ~/runs/x` made a folder
    named "~" in the working directory, and `data: ~/x.txt` was "not found"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("stage: mntp\nmodel: {name_or_path: x, adapters: [~/a/adapter]}\noutput_dir: ~/runs/x\n"
                    "data: [~/d.txt, hf:wikitext]\neval_data: [~/e.txt]\n")
    cfg = load_config(str(path))
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.data == [str(tmp_path / "d.txt"), "hf:wikitext"] and cfg.eval_data == [str(tmp_path / "e.txt")]
    assert cfg.model.adapters == [str(tmp_path / "a" / "adapter")]


@pytest.mark.parametrize("over,want", [
    (["eval_data=data/stsbenchmark/sts-dev.csv", "eval_every=0"], "eval_every is 0: the run never evaluates"),
    (["eval_data=data/stsbenchmark/sts-dev.csv", "eval_every=25", "max_steps=20"],
     "eval_every 25 > max_steps 20: the run never evaluates"),
    (["eval_data=data/stsbenchmark/sts-dev.csv", "eval_every=4", "max_steps=10"],
     "eval_every 4 does not divide max_steps 10: the last evaluation is at step 8, steps 9-10 are never scored"),
    (["eval_data=data/stsbenchmark/sts-dev.csv", "eval_every=5", "max_steps=10"], None),
    (["eval_data=[]", "eval_every=0"], None),
])
def test_an_evaluation_that_would_not_score_the_run_is_warned_about(over, want):
    """eval_data with eval_every 0 or above max_steps never evaluates (no dev curve, no best/), and eval_every not
    dividing max_steps leaves the last step unscored, which engine.pick refuses: said at load by the dry run and the
    run, not after the run."""
    from engine.config import eval_warning

    w = eval_warning(load_config(os.path.join(ROOT, "configs/tiny/simcse.yaml"), over))
    assert (w is None) if want is None else (want in w), w


def test_the_dry_run_gives_the_warnings_the_run_gives(capsys):
    """The schedule's, SimCSE's dropout and the evaluation warnings were given by the run only, after the model had
    loaded; the dry run, the tool for vetting a config before taking the GPUs, said nothing."""
    from engine.train import main

    assert main(["--config", os.path.join(ROOT, "configs/tiny/simcse.yaml"), "--dry-run", "warmup_steps=50",
                 "model.attention_dropout=0", "lora.dropout=0", "eval_data=data/stsbenchmark/sts-dev.csv",
                 "eval_every=0"]) == 0
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "WARNING" in ln]
    assert any("warmup_steps 50 >= max_steps" in w for w in warnings), warnings
    assert any("SimCSE with no dropout" in w for w in warnings), warnings
    assert any("eval_every is 0: the run never evaluates" in w for w in warnings), warnings
    # lr_decay_epochs needs the data's size, which a dry run does not read: no warning on it, and no error
    assert main(["--config", os.path.join(ROOT, "configs/tiny/simcse.yaml"), "--dry-run", "lr_decay_epochs=1"]) == 0


def test_overrides_may_come_after_a_flag(capsys):
    from engine.train import main

    assert main(["--config", os.path.join(ROOT, "configs/tiny/mntp.yaml"), "max_steps=20", "--print-config",
                 "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "\nmax_steps: 20\n" in out and "\n  r: 4\n" in out


def test_max_seq_len_is_no_part_of_a_contrastive_runs_identity():
    """A contrastive stage cuts texts at contrastive.max_len; max_seq_len (MNTP's) does nothing there but made
    resume refuse the run's own checkpoint as another run's. A checkpoint saved with the key still resumes; an MNTP
    run keeps it."""
    from engine.checkpoint import fingerprint, fingerprint_diff

    sup = os.path.join(ROOT, "configs/mistral-7b/supervised.yaml")
    a, b = fingerprint(load_config(sup)), fingerprint(load_config(sup, ["max_seq_len=4096"]))
    assert a == b and "max_seq_len" not in a
    assert fingerprint_diff(dict(a, max_seq_len=512), b) == []  # saved before the key was left out
    other_len = fingerprint(load_config(sup, ["contrastive.max_len=256"]))
    assert fingerprint_diff(a, other_len)[0][0] == "contrastive.max_len"
    mntp = os.path.join(ROOT, "configs/mistral-7b/mntp.yaml")
    assert fingerprint_diff(fingerprint(load_config(mntp)), fingerprint(load_config(mntp, ["max_seq_len=256"]))) == [
        ("max_seq_len", 512, 256)]


def test_recompute_on_and_off_mean_the_same_in_a_file_and_an_override():
    """YAML 1.1 reads `gradient_checkpointing: off` in a file as false (none); the override `=off` was refused."""
    tiny = os.path.join(ROOT, "configs/tiny/mntp.yaml")
    for word, want in (("off", "none"), ("on", "full")):
        assert load_config(tiny, [f"model.gradient_checkpointing={word}"]).model.gradient_checkpointing == want
        # a section given as YAML is read as the file is: `off` a boolean
        assert load_config(tiny, [f"model={{gradient_checkpointing: {word}}}"]).model.gradient_checkpointing == want


def test_a_printed_config_run_as_another_stage_takes_that_stages_default(tmp_path, capsys):
    """--print-config resolved contrastive.temperature by the stage in place: the printed MNTP config, switched to
    stage=supervised, trained at SimCSE's 0.05 where its source gives supervised's 0.02."""
    from engine.train import main

    src = os.path.join(ROOT, "configs/tiny/mntp.yaml")
    assert main(["--config", src, "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "# contrastive.temperature unset: the mntp stage's default, 0.05" in printed.read_text()
    for stage, want in (("supervised", 0.02), ("simcse", 0.05)):
        assert load_config(str(printed), [f"stage={stage}"]).contrastive.temperature == want
        assert load_config(src, [f"stage={stage}"]).contrastive.temperature == want
    # a temperature the config sets prints as set
    assert main(["--config", src, "--print-config", "contrastive.temperature=0.1"]) == 0
    assert "\n  temperature: 0.1\n" in capsys.readouterr().out
