"""LoRA adapters through peft: add them to our UNet or text encoder, save them as the SD ecosystem reads them
(diffusers' peft keys, or kohya's sd-scripts keys), load such files, scale and merge.

The adapters are peft's layers (``LoraConfig`` + ``inject_adapter_in_model``), injected in place, so the module
keeps its class and its names. The names a file uses are diffusers' module names: our UNet's (SD layout) are mapped
with ``ldm.convert``'s key map, a transformers CLIP tower's get the ``text_model.`` prefix SD files use.

- diffusers format: ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.`` for the text
  encoder), with the adapter's ``LoraConfig`` (rank, alpha, targets) in the safetensors metadata
  ``lora_adapter_metadata``, as diffusers' ``save_lora_weights`` writes it.
- kohya format: ``lora_unet_<diffusers module, dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (``lora_te_`` for the text encoder), as sd-scripts writes SD 1.x/2.x LoRAs.

The scale of a module's update is ``alpha / rank`` (times the adapter scale), in both formats.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.convert.diffusers_format import rename_state_dict, unet_key_map
from ldm.convert.single_file import read_sd_file, save_state_dict
from ldm.errors import ConfigError
from ldm.text.base import TextEncoder
from ldm.unet import UNet

ADAPTER = "default"  # the one peft adapter name ldm uses
FORMATS = ("diffusers", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry for the LoraConfig
PARTS = {"unet": ("unet", "lora_unet_"), "text_encoder": ("text_encoder", "lora_te_")}  # diffusers, kohya prefixes

# Named target sets: suffixes of module names (peft's matching: the whole name or its end after a dot).
UNET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feed_forward": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),  # the transformers' in/out projections (1x1 conv in SD 1.x, linear in SD 2.x)
    "conv": ("in_layers.2", "out_layers.3", "skip_connection", "op", "conv"),  # ResBlock, down/upsampler convs
    "time_emb": ("emb_layers.1",),  # each ResBlock's projection of the time embedding
}
UNET_PRESETS["transformer"] = UNET_PRESETS["attention"] + UNET_PRESETS["feed_forward"] + UNET_PRESETS["proj"]
TEXT_PRESETS: dict[str, tuple[str, ...]] = {
    "text_attention": ("q_proj", "k_proj", "v_proj", "out_proj", "attn.qkv", "attn.out"),
    "text_mlp": ("mlp.fc1", "mlp.fc2", "mlp.c_fc", "mlp.c_proj", "mlp.0", "mlp.2"),
}
DEFAULT_TARGETS = {"unet": ("attention",), "text_encoder": ("text_attention",)}


def _peft():
    """peft, imported on first use (it pulls in transformers and accelerate)."""
    try:
        import peft  # noqa: PLC0415
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    except ImportError as err:
        raise ConfigError(f"LoRA needs peft: pip install 'peft>=0.13' ({err})") from err
    return peft, LoraLayer


def part_of(model: nn.Module) -> str:
    """``unet`` or ``text_encoder``: which part of a pipeline ``model`` is (its prefix in LoRA files)."""
    if isinstance(model, UNet):
        return "unet"
    if isinstance(model, TextEncoder):
        return "text_encoder"
    raise TypeError(f"LoRA works on ldm's UNet and text encoders, got {type(model).__name__}")


# ------------------------------------------------------------------------------------------------------- modules


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` by module name (empty without adapters)."""
    _, LoraLayer = _peft()
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (without importing peft when it has none)."""
    return bool(getattr(model, "peft_config", None))


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Modules peft can adapt (Linear, Conv2d) by name, a LoRA layer standing for its base layer; a Linear that
    ``nn.MultiheadAttention`` owns is left out (its forward reads the weight directly, so an adapter would do
    nothing)."""
    lora = lora_layers(model) if has_lora(model) else {}
    out: dict[str, nn.Module] = dict(lora)
    skip = tuple(f"{n}." for n in lora) + tuple(f"{n}." for n, m in model.named_modules()
                                                 if isinstance(m, nn.MultiheadAttention))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.startswith(skip) and name not in out:
            out[name] = module
    return out


def _presets(part: str) -> dict[str, tuple[str, ...]]:
    return UNET_PRESETS if part == "unet" else TEXT_PRESETS


def resolve_targets(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """The names of the modules ``targets`` selects in ``model``: preset names (``UNET_PRESETS``,
    ``TEXT_PRESETS``) or module-name suffixes (``to_q``, ``ff.net.2``, a full name). Each entry must select at
    least one Linear or Conv2d; an entry that selects none is a ConfigError listing the valid names."""
    part = part_of(model)
    presets = _presets(part)
    entries = list(DEFAULT_TARGETS[part] if targets is None else [targets] if isinstance(targets, str) else targets)
    if not entries:
        raise ConfigError("LoRA targets are empty: give preset names or module names")
    modules = _adaptable(model)
    chosen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(f"LoRA target {entry!r} is not a name")
        suffixes = presets.get(entry, (entry,))
        hit = {n for n in modules if any(n == s or n.endswith("." + s) for s in suffixes)}
        if not hit:
            leaves = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                             for n in modules})
            raise ConfigError(f"LoRA target {entry!r} matches no Linear or Conv2d of the {part}; valid presets: "
                              f"{', '.join(presets)}; or module names (suffixes) such as {', '.join(leaves[:30])}")
        chosen |= hit
    return sorted(chosen)


def _check_numbers(rank: int, alpha: float | None, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ConfigError(f"LoRA alpha must be a finite number > 0 (or null: alpha = rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must lie in [0, 1), got {dropout!r}")


def _pattern(name: str) -> str:
    """A peft rank/alpha pattern that matches exactly the module ``name``."""
    return "^" + re.escape(name)


def _inject(model: nn.Module, ranks: Mapping[str, int], alphas: Mapping[str, float], dropout: float) -> nn.Module:
    """Inject peft LoRA layers into the named modules: one config, per-module exceptions as rank/alpha patterns."""
    if has_lora(model):
        raise ConfigError(f"the {part_of(model)} already has a LoRA adapter: merge it first (merge_lora), or load "
                          "into a model without one")
    peft, _ = _peft()
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=sorted(ranks),
        rank_pattern={_pattern(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={_pattern(n): a for n, a in alphas.items() if a != alpha},
    )
    training = model.training
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.train(training)  # the new layers (their dropout) follow the model's mode
    _changed(model)
    return model


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             targets: str | Sequence[str] | None = None) -> nn.Module:
    """Add trainable LoRA adapters (B = 0: the output is unchanged) to ``model`` in place; the rest of its weights
    stop requiring gradients. ``alpha=None`` is alpha = rank (scale 1); ``targets`` as in :func:`resolve_targets`,
    by default the attention projections. Returns ``model``."""
    _check_numbers(rank, alpha, dropout)
    names = resolve_targets(model, targets)
    alpha = float(rank if alpha is None else alpha)
    return _inject(model, dict.fromkeys(names, rank), dict.fromkeys(names, alpha), dropout)


def _changed(model: nn.Module) -> None:
    """A text encoder caches its null embedding while frozen: new adapter weights make it stale."""
    clear = getattr(model, "_clear_null_cache", None)
    if callable(clear):
        clear()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under our module names: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
        out[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
    return out


def lora_alphas(model: nn.Module) -> dict[str, float]:
    """Each adapted module's alpha, by our module name."""
    return {name: float(layer.lora_alpha[ADAPTER]) for name, layer in lora_layers(model).items()}


def lora_config(model: nn.Module) -> dict[str, Any]:
    """What rebuilds the adapters with :func:`load_lora_state_dict`: ``alpha`` per module and ``dropout`` (the
    ranks are in the weights' shapes)."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(f"the {part_of(model)} has no LoRA adapter")
    dropouts = {float(getattr(m.lora_dropout[ADAPTER], "p", 0.0)) for m in layers.values()}
    return {"alphas": lora_alphas(model), "dropout": dropouts.pop() if len(dropouts) == 1 else 0.0}


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                         alphas: float | Mapping[str, float] | None = None, dropout: float = 0.0,
                         scale: float = 1.0) -> nn.Module:
    """Add adapters to ``model`` for the modules ``state_dict`` (our names, as :func:`lora_state_dict` gives)
    names, with its weights: the ranks come from the shapes, ``alphas`` (one value or one per module; None: alpha =
    rank). Keys that name no module of ``model`` are a ConfigError."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in state_dict.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            bad.append(key)
        else:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
    modules = _adaptable(model)
    unknown = [n for n in pairs if n not in modules]
    half = [n for n, p in pairs.items() if len(p) != 2]
    if bad or unknown or half or not pairs:
        raise ConfigError(f"the LoRA weights do not fit the {part_of(model)}: {len(unknown)} of {len(pairs)} "
                          f"modules are not in it (first: {unknown[:5]}), {len(half)} lack lora_A or lora_B "
                          f"(first: {half[:5]}), {len(bad)} keys are not LoRA weights (first: {bad[:5]})")
    ranks = {n: int(p["A"].shape[0]) for n, p in pairs.items()}
    if alphas is None or isinstance(alphas, (int, float)):
        alphas = {n: float(ranks[n] if alphas is None else alphas) for n in pairs}
    else:
        alphas = {n: float(alphas.get(n, ranks[n])) for n in pairs}
    _inject(model, ranks, alphas, dropout)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, p in pairs.items():
            for which, table in (("A", layers[name].lora_A), ("B", layers[name].lora_B)):
                weight = table[ADAPTER].weight
                if tuple(weight.shape) != tuple(p[which].shape):
                    raise ConfigError(f"LoRA weight {name}.lora_{which}: shape {tuple(p[which].shape)} does not fit "
                                      f"the module ({tuple(weight.shape)})")
                weight.copy_(p[which].to(weight.dtype))
    if scale != 1.0:
        set_lora_scale(model, scale)
    _changed(model)
    return model


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale every adapter's update by ``scale`` (1: as trained, 0: off) on top of alpha / rank."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"lora scale must be a finite number, got {scale!r}")
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(f"the {part_of(model)} has no LoRA adapter to scale")
    for layer in layers.values():
        layer.set_scale(ADAPTER, float(scale))
    _changed(model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (peft's merge) and put the plain modules back: the model is as
    fast as the base and has no adapter left. Returns ``model``."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(f"the {part_of(model)} has no LoRA adapter to merge")
    for name, layer in layers.items():
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    del model.peft_config
    _changed(model)
    return model


# ------------------------------------------------------------------------------------------------------ file names


def export_names(model: nn.Module) -> dict[str, str]:
    """Our module name -> the name LoRA files use (diffusers' module names; a transformers CLIP tower as
    ``text_model.…``) for every module an adapter can sit on."""
    names = list(_adaptable(model))
    if isinstance(model, UNet):
        key_map = unet_key_map(model.config)
        out = {}
        for name in names:
            try:
                out[name] = next(iter(rename_state_dict({f"{name}.weight": None}, key_map, "UNet")))[:-7]
            except ConfigError:
                continue  # a module diffusers' UNet has no place for (e.g. pool_context's MLP)
        return out
    inner = getattr(model, "model", None)
    if inner is not None and type(inner).__module__.startswith("transformers"):  # HFCLIPTextEncoder
        return {n: n[len("model."):] if n.startswith("model.text_model.") else "text_model." + n[len("model."):]
                for n in names if n.startswith("model.")}
    return {n: n for n in names}


def _kohya(prefix: str, name: str) -> str:
    return prefix + name.replace(".", "_")


def save_lora(model: nn.Module, path: str | Path, format: str = "diffusers",
              text_encoder: nn.Module | None = None) -> Path:
    """Write ``model``'s adapters (and ``text_encoder``'s, if given and adapted) to ``path`` (.safetensors) in the
    ``diffusers`` or ``kohya`` format (see the module's docstring). Returns the path."""
    if format not in FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; use one of {', '.join(FORMATS)}")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for module in (model, text_encoder):
        if module is None or (module is text_encoder and not has_lora(module)):
            continue
        part = part_of(module)
        layers = lora_layers(module)
        if not layers:
            raise ConfigError(f"the {part} has no LoRA adapter to save: add_lora or load_lora first")
        names = export_names(module)
        missing = [n for n in layers if n not in names]
        if missing:
            raise ConfigError(f"{len(missing)} adapted modules of the {part} have no diffusers name (first: "
                              f"{missing[:3]}): they cannot be written as a {format} LoRA")
        alphas = lora_alphas(module)
        weights = lora_state_dict(module)
        prefix, kohya_prefix = PARTS[part]
        for name in layers:
            a, b = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
            if format == "diffusers":
                tensors[f"{prefix}.{names[name]}.lora_A.weight"] = a
                tensors[f"{prefix}.{names[name]}.lora_B.weight"] = b
            else:
                key = _kohya(kohya_prefix, names[name])
                tensors[f"{key}.lora_down.weight"] = a
                tensors[f"{key}.lora_up.weight"] = b
                tensors[f"{key}.alpha"] = torch.tensor(alphas[name], dtype=a.dtype)
        if format == "diffusers":
            # the text tower's names without text_model. (a CLIPTextModel of transformers >= 5 has none), which
            # peft's suffix rule matches in either layout
            short = {n: names[n].removeprefix("text_model.") for n in layers}
            pattern = _pattern if part == "unet" else re.escape
            ranks = {short[n]: int(weights[f"{n}.lora_A.weight"].shape[0]) for n in layers}
            exported = {short[n]: alphas[n] for n in layers}
            rank = Counter(ranks.values()).most_common(1)[0][0]
            alpha = Counter(exported.values()).most_common(1)[0][0]
            config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
                      "rank_pattern": {pattern(n): r for n, r in ranks.items() if r != rank},
                      "alpha_pattern": {pattern(n): a for n, a in exported.items() if a != alpha}}
            metadata.update({f"{prefix}.{k}": v for k, v in config.items()})
    if not tensors:
        raise ConfigError("nothing to save: no LoRA adapter")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"LoRA files are .safetensors, got {path}")
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else {}
    meta["ldm.lora_format"] = format
    save_state_dict({k: v.detach().float() if v.dtype == torch.float64 else v.detach() for k, v in tensors.items()},
                    path, meta)
    return path


# --------------------------------------------------------------------------------------------------------- reading


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """A LoRA file's tensors, its diffusers adapter metadata (``{"unet.r": ...}``, empty without) and its format
    (``diffusers`` or ``kohya``, told by the keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no LoRA file at {path}")
    tensors, raw = read_sd_file(path)
    meta = json.loads(raw[METADATA_KEY]) if raw.get(METADATA_KEY) else {}
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in tensors):
        return tensors, meta, "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in tensors):
        return tensors, meta, "diffusers"
    raise ConfigError(f"{path} is not a LoRA file ldm reads: neither diffusers/peft keys (unet.….lora_A.weight) nor "
                      f"kohya keys (lora_unet_….lora_down.weight); first keys: {sorted(tensors)[:5]}")


def lora_file_parts(path: str | Path) -> set[str]:
    """Which parts (``unet``, ``text_encoder``) a LoRA file has adapters for."""
    tensors, _, fmt = read_lora_file(path)
    return {part for part in PARTS if any(k.startswith(_file_prefixes(part, fmt)) for k in tensors)}


def _file_prefixes(part: str, fmt: str) -> tuple[str, ...]:
    """The key prefixes of ``part``'s adapters in a file of format ``fmt``."""
    if fmt == "diffusers":
        return (PARTS[part][0] + ".",)
    return (PARTS[part][1], "lora_te1_") if part == "text_encoder" else (PARTS[part][1],)


def _parse(model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], fmt: str,
           path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The file's adapters of ``model``'s part under our module names, and their alphas."""
    part = part_of(model)
    prefix, kohya_prefix = PARTS[part]
    ours = export_names(model)
    lookup = {theirs: name for name, theirs in ours.items()} | {name: name for name in ours}
    if part == "text_encoder":  # a CLIP tower without text_model. (transformers >= 5 files)
        lookup |= {theirs[len("text_model."):]: name for name, theirs in ours.items()
                   if theirs.startswith("text_model.")}
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    if fmt == "kohya":
        kohya_lookup = {_kohya(kohya_prefix, k): v for k, v in lookup.items()}
        if part == "text_encoder":
            kohya_lookup |= {_kohya("lora_te1_", k): v for k, v in lookup.items()}
        for key, value in tensors.items():
            module, _, leaf = key.partition(".")
            if not module.startswith(_file_prefixes(part, fmt)):
                continue
            name = kohya_lookup.get(module)
            if name is None:
                unknown.append(key)
            elif leaf == "lora_down.weight":
                state[f"{name}.lora_A.weight"] = value
            elif leaf == "lora_up.weight":
                state[f"{name}.lora_B.weight"] = value
            elif leaf == "alpha":
                alphas[name] = float(value)
            else:
                unknown.append(key)
    else:
        config = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
        for key, value in tensors.items():
            if not key.startswith(prefix + "."):
                continue
            m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key[len(prefix) + 1:])
            name = lookup.get(m.group(1)) if m else None
            if name is None:
                unknown.append(key)
            else:
                state[f"{name}.lora_{m.group(2)}.weight"] = value
        default = config.get("lora_alpha")
        patterns = config.get("alpha_pattern") or {}
        for name, theirs in ours.items():
            if f"{name}.lora_A.weight" not in state:
                continue
            # peft's rule: a pattern matches the module name or its end after a dot
            hit = [a for p, a in patterns.items() if re.match(rf"(.*\.)?({p})$", theirs)]
            alpha = hit[0] if hit else default
            if alpha is not None:
                alphas[name] = float(alpha)
    if unknown or not state:
        found = sorted(k for k in tensors if k.startswith(_file_prefixes(part, fmt)))
        raise ConfigError(f"{path}: {len(unknown)} LoRA keys name no module of the {part} "
                          f"(first: {unknown[:5]}); {len(found)} keys are for the {part}. Is it a LoRA for another "
                          "model (e.g. SDXL or another UNet config)?")
    return state, alphas


def load_lora(model: nn.Module, path: str | Path, scale: float = 1.0) -> nn.Module:
    """Add the adapters of a LoRA file (diffusers or kohya format, told by its keys) for ``model``'s part (the UNet
    or the text encoder) to ``model``, scaled by ``scale``. Keys of that part that name no module of ``model``
    are a ConfigError. Returns ``model``."""
    path = Path(path)
    tensors, meta, fmt = read_lora_file(path)
    state, alphas = _parse(model, tensors, meta, fmt, path)
    return load_lora_state_dict(model, state, alphas, scale=scale)


def trainable_lora_parameters(modules: Iterable[nn.Module | None]) -> list[nn.Parameter]:
    """The adapter parameters of ``modules`` (what a LoRA run optimizes)."""
    out = []
    for module in modules:
        if module is None:
            continue
        for layer in lora_layers(module).values():
            out += list(layer.lora_A.parameters()) + list(layer.lora_B.parameters())
    return out
