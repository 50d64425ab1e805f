"""Load a seq2seq model and its tokenizer from a local directory (T5 / Flan-T5 / BART families).

Any directory written by ``save_pretrained`` works: one made by
:mod:`fsam_dist.seq2seq.init_model`, or a user's copy of t5-base, flan-t5-large, bart-large, ...
Hub ids are never downloaded: a name that is not an existing directory fails at once with a
message saying to pass one (or to make a small random model with ``fsam-init-model``).
"""

from __future__ import annotations

from pathlib import Path

import torch

T5_TYPES = {"t5", "mt5", "umt5", "longt5"}
BART_TYPES = {"bart", "mbart"}


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded; the message says why and what to do."""


def _resolve(name_or_path: str) -> str:
    """The local model directory; anything else is an error at once (hub ids are never
    downloaded: on a machine without network that would retry for half a minute)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{name_or_path!r} does not exist (hub ids are not downloaded): pass a local directory written by "
            f"save_pretrained (config.json, weights and tokenizer files), or make a small random model there with "
            f"`fsam-init-model --arch t5 --out {name_or_path} --train-file builtin:cmudict`")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is a file; pass the directory that save_pretrained "
                             f"wrote (with config.json)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {str(path)!r} has no config.json: pass a directory written by "
                             f"save_pretrained, or make one with `fsam-init-model`")
    return str(path)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""The weight files ``from_pretrained`` reads (one of them must be in the model directory)."""


def load_config_and_tokenizer(name_or_path: str):
    """``(source, config, tokenizer)``: every check of :func:`load_model_and_tokenizer` that does not
    need the weights (so it can run before any process group, without loading the model).

    The vocabulary check uses ``config.vocab_size`` (the embedding's row count for T5/BART), and
    the directory must hold one of :data:`WEIGHT_FILES`.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = _resolve(str(name_or_path))
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the model config of {source!r}: {err}") from err
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{source!r} is a {config.model_type!r} model, not an encoder-decoder: use a "
                             f"seq2seq model such as T5, Flan-T5 or BART")
    if not any((Path(source) / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"cannot load the model weights of {source!r}: none of {', '.join(WEIGHT_FILES)} is "
                             f"there; save the model with save_pretrained into that directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {source!r} (tokenizer.json / tokenizer_config.json "
                             f"expected beside the model): {err}") from err
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(
            f"the tokenizer of {source!r} has no pad token, which batching needs: add one and save it, e.g. "
            f"`tok.pad_token = tok.eos_token` (or `tok.add_special_tokens({{'pad_token': '<pad>'}})` plus "
            f"`model.resize_token_embeddings(len(tok))`), then `tok.save_pretrained(DIR)`")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelLoadError(f"the tokenizer of {source!r} has {len(tokenizer)} tokens but the model's embedding "
                             f"has {vocab} rows: they do not belong together (or call "
                             f"model.resize_token_embeddings(len(tokenizer)) and save)")
    if config.decoder_start_token_id is None:
        raise ModelLoadError(f"the model config of {source!r} has no decoder_start_token_id; set it (T5: the pad "
                             f"id, BART: the eos id) in config.json")
    return source, config, tokenizer


def load_model(source: str, dtype: torch.dtype = torch.float32):
    """``AutoModelForSeq2SeqLM.from_pretrained(source)``; a failure is a :class:`ModelLoadError`.
    ZeRO-3 does not come here: ``train/loading.py`` builds the model partitioned and streams the
    checkpoint into it (transformers' own ZeRO-3 path reads the whole state dict on rank 0)."""
    from transformers import AutoModelForSeq2SeqLM

    try:
        return AutoModelForSeq2SeqLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the model weights of {source!r}: {err}") from err


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` via ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer.from_pretrained``.

    Raises :class:`ModelLoadError` for a missing directory (or a hub id when offline), a directory
    without ``config.json`` or weights, a model that is not an encoder-decoder, a tokenizer without
    a pad token, or a tokenizer whose ids do not fit the model's vocabulary.
    """
    source, _, tokenizer = load_config_and_tokenizer(name_or_path)
    model = load_model(source, dtype)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ModelLoadError(f"the tokenizer of {source!r} has {len(tokenizer)} tokens but the model's embedding "
                             f"has {vocab} rows: they do not belong together (or call "
                             f"model.resize_token_embeddings(len(tokenizer)) and save)")
    return model, tokenizer


def model_kind(model) -> str:
    """``'t5'`` or ``'bart'`` for a model (or a DDP/DeepSpeed/FSDP wrapper with ``.module``)."""
    seen = 0
    while not hasattr(model, "config") and hasattr(model, "module") and seen < 8:
        model, seen = model.module, seen + 1
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in T5_TYPES:
        return "t5"
    if model_type in BART_TYPES:
        return "bart"
    raise ValueError(f"unsupported model type {model_type!r}: expected a T5 ({', '.join(sorted(T5_TYPES))}) or "
                     f"BART ({', '.join(sorted(BART_TYPES))}) model")


def model_from_state_dict(config, state_dict: dict) -> torch.nn.Module:
    """A plain (unsharded, fp32) model of ``config`` holding ``state_dict``.

    Backends consolidate state dicts differently (tied embeddings present once or under every
    name); loading into a fresh model and re-tying makes ``save_pretrained`` and generation the
    same whatever the backend. Anything missing other than a tied embedding is an error.
    """
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_config(config)
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
             for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    untied = [k for k in missing if not k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if unexpected or untied:
        raise RuntimeError(f"consolidated state dict does not fit the model: missing {untied}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    return model
