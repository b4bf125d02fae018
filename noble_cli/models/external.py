"""Models from other libraries, built from a config alone (no hub, no weights): transformers and timm.

- `hf:MODEL_TYPE` (e.g. `hf:llama`, `hf:gpt2`, `hf:vit`): transformers' config class for that type with its own
  defaults except for the sizes, which are made tiny (`HF_TINY`, only the fields the config has).
- a path to a transformers `config.json`: that config as it is (its `model_type` picks the class).
- `timm:NAME`: `timm.create_model(NAME, pretrained=False)`.

The model class is the family's language-model or classification head, whichever the config has first among
masked LM, causal LM, image classification, else the bare model. transformers and timm are optional
(`pip install "noble-cli[hf]"`); a missing one is a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from noble_cli.errors import NobleError

# Small enough for a CPU test, large enough that a rank-32 branch fits every projection (GQA k/v are 64 wide).
HF_TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=256, vocab_size=1024, max_position_embeddings=256, image_size=32, patch_size=8)
HF_EXTRA = 'pip install "noble-cli[hf]"'


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise NobleError(f"{name} is not installed; install the optional extra: {HF_EXTRA}") from None


def _is_checkout(entry: str) -> bool:
    """A sys.path entry that is a checkout of this repository (its `kernels/` folder is importable as `kernels`)."""
    root = Path(entry or ".")
    return (root / "kernels" / "__init__.py").is_file() and (root / "noble_cli").is_dir()


def import_transformers():
    """transformers with its model code loaded, never taking this repository's `kernels/` folder for Hugging Face's
    `kernels` package. From a checkout (`python -m ...`, or PYTHONPATH) that folder is importable as `kernels`; with no
    version metadata to read, transformers imports it to find one, a second copy of the Triton kernels under
    another name, which breaks the interpreted kernels that share the process. The check is cached, so hiding the
    checkout while `transformers.modeling_utils` first loads is enough."""
    import importlib
    import sys

    transformers = _import("transformers")
    if "transformers.modeling_utils" not in sys.modules:
        saved = list(sys.path)
        sys.path[:] = [p for p in saved if not _is_checkout(p)]
        try:
            importlib.import_module("transformers.modeling_utils")
        finally:
            sys.path[:] = saved
    return transformers


def hf_config(spec: str):
    """`hf:MODEL_TYPE` (tiny sizes) or a config.json path -> a transformers config."""
    transformers = import_transformers()
    if spec.startswith("hf:"):
        model_type, overrides = spec[3:], HF_TINY
    else:
        path = Path(spec).expanduser()
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise NobleError(f"cannot read transformers config {path}: {e}") from None
        model_type, overrides = values.pop("model_type", None), values
    known = transformers.CONFIG_MAPPING
    if model_type not in known:
        examples = "llama, qwen2, mistral, gpt2, gpt_neox, falcon, bert, roberta, vit"
        raise NobleError(f"unknown transformers model_type {model_type!r}; valid: one of the "
                         f"{len(list(known.keys()))} transformers {transformers.__version__} knows, e.g. {examples}")
    if spec.startswith("hf:"):
        overrides = _tiny(known[model_type]())
    return transformers.AutoConfig.for_model(model_type, **overrides)


def _tiny(defaults) -> dict:
    """The HF_TINY sizes this family's config has (others would become stray attributes), and special token ids
    moved inside the tiny vocabulary (GPT-2's 50256 would not be a token of it)."""
    tiny = {k: v for k, v in HF_TINY.items()  # an int size only where the family has one (Swin's are lists)
            if isinstance(getattr(defaults, k, None), int) and not isinstance(getattr(defaults, k), bool)}
    vocab = tiny.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(defaults, key, None)
        if vocab and isinstance(value, int) and value >= vocab:
            tiny[key] = vocab - 1
    return tiny


def hf_model(config) -> nn.Module:
    """The family's masked-LM, causal-LM or image-classification model for `config`, else its bare model."""
    transformers = import_transformers()
    for auto, mapping in (("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING"),
                          ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING"),
                          ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING"),
                          ("AutoModel", "MODEL_MAPPING")):
        if type(config) in getattr(transformers, mapping):
            return getattr(transformers, auto).from_config(config)
    raise NobleError(f"transformers has no model class for config {type(config).__name__}")


def timm_model(name: str) -> nn.Module:
    timm = _import("timm")
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError:  # timm's "Unknown model (...)"
        raise NobleError(f"unknown timm model {name!r}; valid: a name from timm.list_models(), e.g. "
                         "vit_small_patch16_224, deit_tiny_patch16_224, swin_tiny_patch4_window7_224") from None


def example_input(model: nn.Module) -> torch.Tensor:
    """One input of the right kind for a transformers or timm model: token ids (1, T) or images (1, C, H, W)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(model, "main_input_name", "input_ids") == "input_ids":
        length = min(128, getattr(config, "max_position_embeddings", 128) or 128)
        return torch.zeros(1, length, dtype=torch.long)
    if config is not None:
        size = config.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return torch.zeros(1, getattr(config, "num_channels", 3), h, w)
    c, h, w = model.pretrained_cfg["input_size"]  # timm
    return torch.zeros(1, c, h, w)


# --- a transformers causal LM to train from scratch (the hf_causal_lm task) -----------------------------------------


def _read_config_json(path: str) -> dict:
    p = Path(path).expanduser()
    try:
        values = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise NobleError(f"cannot read model.config_json {p}: {e}") from None
    if not isinstance(values, dict):
        raise NobleError(f"model.config_json {p} must hold a JSON object of config fields")
    return values


def causal_lm_config(model_type: str | None, config_json: str | None, fields: dict, extra: dict, vocab_size: int,
                     eot_id: int):
    """The transformers config of a causal LM to train from scratch: a config.json's fields (if given), then the
    set `fields` (sizes), then `extra`, and `vocab_size` (the tokenizer's). Special token ids outside that vocabulary
    (a family's defaults for its own tokenizer) become the end-of-text id. Each problem is one line naming what is
    valid: an unknown model type, one without a causal-LM class, a field the family's config class lacks."""
    transformers = import_transformers()
    values = _read_config_json(config_json) if config_json else {}
    named = values.pop("model_type", None)
    if model_type and named and model_type != named:
        raise NobleError(f"model.model_type {model_type!r} contradicts model.config_json's {named!r}; leave "
                         "model_type out or make them agree")
    model_type = model_type or named
    known = transformers.CONFIG_MAPPING
    if model_type not in known:
        raise NobleError(f"unknown transformers model_type {model_type!r}; valid: a causal-LM type of transformers "
                         f"{transformers.__version__}, e.g. {', '.join(_causal_examples(transformers))}")
    cls = known[model_type]
    if cls not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise NobleError(f"transformers model_type {model_type!r} has no causal-LM class; valid: e.g. "
                         f"{', '.join(_causal_examples(transformers))}")
    defaults = cls()
    for key in (*fields, *extra):
        if not hasattr(defaults, key):
            where = "model." if key in fields else "model.extra."
            raise NobleError(f"{where}{key} is not a field of transformers' {cls.__name__} ({model_type}); set that "
                             f"family's own fields through model.extra, e.g. {', '.join(_size_fields(defaults))}")
    merged = {**values, **fields, **extra, "vocab_size": vocab_size}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = merged.get(key, getattr(defaults, key, None))
        if isinstance(value, int) and not 0 <= value < vocab_size:
            merged[key] = eot_id
    return transformers.AutoConfig.for_model(model_type, **merged)


def _causal_examples(transformers) -> list[str]:
    return [t for t in ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "falcon")
            if t in transformers.CONFIG_MAPPING]


def _size_fields(config) -> list[str]:
    """The integer fields of a config whose names say they are sizes (what a user would set)."""
    return sorted(k for k, v in config.to_dict().items()
                  if isinstance(v, int) and not isinstance(v, bool) and not k.endswith("_id")
                  and any(w in k for w in ("size", "layer", "head", "embd", "inner", "position", "dim")))


def causal_lm(config) -> nn.Module:
    """The family's causal-LM model, freshly initialised in float32 (mixed precision is the trainer's, whatever
    dtype a config.json was saved with)."""
    transformers = import_transformers()
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
