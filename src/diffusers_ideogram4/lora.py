"""LoRA adapters on both Ideogram 4 transformers (SPEC 8, 9), through diffusers' LoRA machinery and PEFT.

Files in any format `diffusers_ideogram4.lora_formats` reads are parsed, checked against the model, and handed to
diffusers' `load_lora_adapter` as a PEFT state dict with its `LoraConfig` (rank and alpha per module) as metadata;
LyCORIS LoHa / LoKr files (`diffusers_ideogram4.lora_trainers`) go into PEFT's own LoHa / LoKr layers.
"""

import itertools
import os

import torch
import torch.nn as nn
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from .fp8 import keeps_stored_dtype
from .loading import HUB_DOWNLOAD_KWARGS, REPO_ID, key_problems, list_keys, open_safetensors, raise_problems
from .lora_formats import (
    COMPONENTS,
    PEFT_DOWN,
    PEFT_SAVE_PREFIX,
    PEFT_UP,
    LoraFactors,
    _peft_adapter_config,
    convert_lora_state_dict,
    is_known_module,
    lora_config_kwargs,
    peft_state_dict,
)
from .lora_trainers import lycoris_config, parse_adapter_state_dict
from .validation import finite_float


# Saved beside the base weight of a LoRA layer while an adapter is fused with `exact_unfuse=True`.
_UNFUSED_STATE = "_ideogram4_unfused_state"
HUB_KWARGS = (*HUB_DOWNLOAD_KWARGS, "subfolder")

# --------------------------------------------------------------------------------------------------------------------
# Checks against the loaded model


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def check_lora_fits(component: str, model: nn.Module, modules: dict[str, LoraFactors]) -> None:
    """Raise a ValueError naming every module the LoRA targets that the model lacks, cannot wrap, or has another shape.

    Quantized weight-only layers (fp8, nvfp4, GGUF) are Linears: the adapter runs beside the dequantized weight.
    `modules` hold LoRA, LoHa or LoKr factors (anything with `in_features` / `out_features`).
    """
    found = dict(model.named_modules())
    missing, unsupported, mis_shaped = [], [], []
    for name, factors in sorted(modules.items()):
        if name not in found:
            missing.append(f"{component}.{name}")
            continue
        layer = base_layer(found[name])
        if not isinstance(layer, nn.Linear):
            unsupported.append(f"{component}.{name} ({type(layer).__name__})")
        elif factors.in_features != layer.in_features or factors.out_features != layer.out_features:
            mis_shaped.append(
                f"{component}.{name} (LoRA {factors.out_features}x{factors.in_features}, model "
                f"{layer.out_features}x{layer.in_features})"
            )
    labelled = {
        "modules the model does not have": missing,
        "modules PEFT cannot wrap with LoRA": unsupported,
        "modules of another shape": mis_shaped,
    }
    raise_problems(
        "The LoRA does not fit the model (a LoRA for another model or size?); nothing was loaded.",
        key_problems(labelled),
        ValueError,
    )


# --------------------------------------------------------------------------------------------------------------------
# The pipeline mixin


class Ideogram4LoraLoaderMixin(LoraBaseMixin):
    r"""
    LoRA loading for `Ideogram4Pipeline`, on both transformers: `load_lora_weights`, `save_lora_weights`,
    `save_lora_adapter`, `fuse_lora` / `unfuse_lora`, and diffusers' `set_adapters`, `disable_lora`,
    `enable_lora`, `delete_adapters`, `unload_lora_weights`. The adapters are PEFT LoRA layers; a runtime scale goes
    through `pipe(..., attention_kwargs={"scale": s})`.
    """

    _lora_loadable_modules = list(COMPONENTS)

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict,
        target: str | None = None,
        return_lora_metadata: bool = False,
        **kwargs,
    ):
        r"""
        Read a LoRA in any supported format and return it in the diffusers format: keys
        `transformer.<module>.lora_A.weight` / `.lora_B.weight` (and `unconditional_transformer.`), split attention;
        a kohya-style alpha is folded into lora_B, PEFT alpha stays in the metadata.

        Args:
            pretrained_model_name_or_path_or_dict: a hub repo id, a folder, a `.safetensors` file or a state dict.
            target (`str`, *optional*): component for keys without a branch prefix (default "transformer").
            return_lora_metadata (`bool`): also return diffusers' LoRA metadata (the PEFT config per component).
            weight_name, subfolder, cache_dir, revision, token, local_files_only, force_download, proxies: where to find
                the file. metadata: diffusers' LoRA metadata that goes with a state dict passed in memory.
        """
        state_dict, metadata = cls._read_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        converted, converted_metadata = convert_lora_state_dict(state_dict, "diffusers", metadata, target)
        return (converted, converted_metadata) if return_lora_metadata else converted

    @staticmethod
    def _read_lora(pretrained_model_name_or_path_or_dict, weight_name=None, metadata=None, **kwargs):
        unknown = sorted(set(kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(
                f"Unexpected arguments {unknown}; LoRA loading accepts `weight_name`, `metadata` and {list(HUB_KWARGS)}."
            )
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            state_dict = dict(pretrained_model_name_or_path_or_dict)
            if metadata is None and any(key.startswith(PEFT_SAVE_PREFIX) for key in state_dict):
                raise ValueError(
                    f"The LoRA state dict holds a PEFT adapter (`{PEFT_SAVE_PREFIX}` keys) without `metadata=`, so its "
                    "`lora_alpha` is unknown (a file without its adapter_config.json is refused alike). Pass "
                    "`metadata=` (the LoraConfig as a dict, e.g. `peft_model.peft_config['default'].to_dict()`)."
                )
            return state_dict, metadata
        if weight_name is not None and not weight_name.endswith(".safetensors"):
            raise ValueError(f"`weight_name={weight_name!r}`: LoRA weights are read from safetensors files only.")
        path = str(pretrained_model_name_or_path_or_dict)
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path}: LoRA weights are read from safetensors files only.")
            with open_safetensors(path):  # a damaged file is named, with what is wrong
                pass
        elif not os.path.exists(path) and not REPO_ID.match(path):
            raise FileNotFoundError(f"{path} is neither a file, a folder, nor a hub repo id (`owner/name`).")
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=weight_name,
            use_safetensors=True,
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=False,
            metadata=metadata,
            **{**dict.fromkeys(HUB_KWARGS), "force_download": False, **kwargs},
        )
        if metadata is None and any(key.startswith(PEFT_SAVE_PREFIX) for key in state_dict):
            metadata = _peft_adapter_config(path, kwargs.get("subfolder"))
        return state_dict, metadata

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: str | None = None,
        target: str | None = None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Load a LoRA, in any supported format (detected from its keys), into the transformer(s) it is for.

        Args:
            pretrained_model_name_or_path_or_dict: a hub repo id, a folder, a `.safetensors` file or a state dict.
            adapter_name (`str`, *optional*): name of the adapter, for `set_adapters` & co.; default `default_<n>`.
            target (`str`, *optional*): "transformer" or "unconditional_transformer": where keys without a branch
                prefix (`transformer.`, `diffusion_model.`, none) go. Default: the conditional transformer. Keys
                prefixed `unconditional_transformer.` always go to the unconditional transformer.
            hotswap (`bool`): replace the weights of the already loaded adapter `adapter_name` in place.
            low_cpu_mem_usage (`bool`): let PEFT skip the random initialisation of the LoRA layers.
            weight_name, subfolder, cache_dir, revision, token, local_files_only, force_download, proxies: where to find
                the file. metadata: diffusers' LoRA metadata that goes with a state dict passed in memory.

        Raises ValueError, before touching the model, for keys that are not understood, modules the transformer does
        not have or cannot wrap (not a Linear), mis-shaped factors and unsupported adapter kinds.
        """
        state_dict, metadata = self._read_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        components = parse_adapter_state_dict(state_dict, metadata, target)
        self._load_parsed_lora(components, adapter_name, hotswap, low_cpu_mem_usage)

    def _load_parsed_lora(
        self, components: dict[str, dict], adapter_name, hotswap: bool, low_cpu_mem_usage: bool
    ) -> str:
        """Load parsed factors `{component: {module: LoraFactors | LohaFactors | LokrFactors}}` into the pipeline's
        components as one adapter: LoRA through diffusers' `load_lora_adapter` (rank and alpha as its metadata), LoHa
        / LoKr through PEFT's own layers. The pipeline is left as it was when anything fails. Returns the adapter's
        name."""
        kind = next(iter(next(iter(components.values())).values())).kind
        if hotswap and kind != "LoRA":
            raise ValueError(
                f"`hotswap=True` is for LoRA adapters; this file is a {kind}. Delete the old one and load it."
            )
        for component, modules in components.items():
            model = getattr(self, component, None)
            if model is None:
                raise ValueError(
                    f"The {kind} has weights for `{component}`, which this pipeline does not have (a CFG-distilled "
                    f"checkpoint, or single-transformer mode?). Load the pipeline with its `{component}`, pass "
                    "`target=` another component, or load an unconditional LoRA with `load_unconditional_lora`."
                )
            if kind != "LoRA" and any(hasattr(m, "_hf_hook") for m in model.modules()):
                raise ValueError(
                    f"`{component}` is offloaded; load {kind} adapters before `enable_model_cpu_offload()` and friends."
                )
            check_lora_fits(component, model, modules)
        adapter_name = self._new_adapter_name(components, adapter_name, kind, hotswap)
        configs = {} if kind == "LoRA" else {c: lycoris_config(modules) for c, modules in components.items()}
        try:
            for component, modules in components.items():
                model = getattr(self, component)
                unexpected = []
                if kind == "LoRA":
                    model.load_lora_adapter(
                        peft_state_dict(modules),
                        prefix=None,
                        adapter_name=adapter_name,
                        metadata=lora_config_kwargs(modules),
                        _pipeline=self,
                        low_cpu_mem_usage=low_cpu_mem_usage,
                        hotswap=hotswap,
                    )
                else:
                    inject_adapter_in_model(
                        configs[component], model, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
                    )
                    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.peft_tensors().items()}
                    unexpected = set_peft_model_state_dict(
                        model, tensors, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
                    ).unexpected_keys
                    model._hf_peft_config_loaded = True
                _check_loaded(component, model, modules, adapter_name, kind, unexpected)
        except Exception:
            if not hotswap:  # leave the pipeline as it was, also when the failure came after PEFT's injection
                for component in components:
                    if adapter_name in getattr(getattr(self, component), "peft_config", {}):
                        getattr(self, component).delete_adapters(adapter_name)
            raise
        return adapter_name

    def _new_adapter_name(self, components, adapter_name: str | None, kind: str, hotswap: bool = False) -> str:
        """The name of an adapter about to be loaded into `components` (default `default_<n>`), refused when the
        components hold adapters of another kind (PEFT holds one kind per transformer) or one of that name (unless
        `hotswap` replaces its weights)."""
        others = {}
        for component in components:
            configs = getattr(getattr(self, component, None), "peft_config", None) or {}
            others[component] = sorted(
                f"{n} ({_adapter_kind(c)})" for n, c in configs.items() if _adapter_kind(c) != kind
            )
        raise_problems(
            f"A transformer holds adapters of one kind at a time; this {kind} adapter cannot join them. Fuse or delete "
            "them first (`fuse_lora`, `delete_adapters`).",
            [f"`{component}` holds {names}" for component, names in others.items() if names],
            ValueError,
        )
        loaded_names = self.get_list_adapters()
        taken = {name for names in loaded_names.values() for name in names}
        adapter_name = adapter_name or next(
            f"default_{i}" for i in itertools.count(len(taken)) if f"default_{i}" not in taken
        )
        # Per component, as in diffusers: one name may cover a LoRA for each branch, loaded from two files.
        in_use = [c for c in components if adapter_name in loaded_names.get(c, [])]
        if in_use and not hotswap:
            hint = "`hotswap=True` to replace its weights, " if kind == "LoRA" else ""
            raise ValueError(
                f"An adapter named {adapter_name!r} is already loaded in {in_use}; pass another `adapter_name`, "
                f"{hint}or `delete_adapters({adapter_name!r})` first."
            )
        return adapter_name

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | None = None,
        unconditional_transformer_lora_layers: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        unconditional_transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        r"""
        Save LoRA layers of either or both transformers in the diffusers format (`transformer.` /
        `unconditional_transformer.` prefixes), with diffusers' LoRA metadata (the PEFT config, which holds alpha).

        Args:
            save_directory: folder to write `pytorch_lora_weights.safetensors` (or `weight_name`) into.
            transformer_lora_layers, unconditional_transformer_lora_layers: PEFT state dicts
                (`peft.utils.get_peft_model_state_dict(pipe.transformer, adapter_name=...)`).
            transformer_lora_adapter_metadata, unconditional_transformer_lora_adapter_metadata: the adapters'
                `peft_config[name].to_dict()`. Without it the file is read back with alpha = rank, so pass it
                whenever lora_alpha differs from r (`save_lora_adapter` does it for you).
        """
        layers = dict(zip(COMPONENTS, (transformer_lora_layers, unconditional_transformer_lora_layers)))
        layers = {component: value for component, value in layers.items() if value}
        metadata = (transformer_lora_adapter_metadata, unconditional_transformer_lora_adapter_metadata)
        metadata = dict(zip(COMPONENTS, metadata))
        if not layers:
            raise ValueError("Pass `transformer_lora_layers` and/or `unconditional_transformer_lora_layers`.")
        storages = set()
        for component, state_dict in layers.items():
            _check_peft_layers(component, state_dict)
            # The same tensors for both transformers (one LoRA on both branches) must be written twice.
            unshared = {}
            for key, tensor in state_dict.items():
                storage = tensor.untyped_storage().data_ptr()
                unshared[key] = tensor.clone() if storage in storages else tensor
                storages.add(storage)
            layers[component] = unshared
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata={component: metadata[component] for component in layers},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def save_lora_adapter(self, save_directory: str | os.PathLike, adapter_name: str, weight_name: str | None = None):
        """Save one loaded adapter, from whichever transformers hold it, in the diffusers format with its metadata."""
        arguments = {}
        for component in COMPONENTS:
            model = getattr(self, component, None)
            if model is not None and adapter_name in getattr(model, "peft_config", {}):
                peft_type = model.peft_config[adapter_name].peft_type
                if str(getattr(peft_type, "value", "")) != "LORA":
                    raise ValueError(
                        f"`{adapter_name}` is a {peft_type.value} adapter; `save_lora_adapter` writes "
                        "LoRA adapters only. Keep the file it was loaded from."
                    )
                arguments[f"{component}_lora_layers"] = get_peft_model_state_dict(model, adapter_name=adapter_name)
                arguments[f"{component}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
        if not arguments:
            raise ValueError(f"No adapter named {adapter_name!r} is loaded; loaded: {self.get_list_adapters()}.")
        self.save_lora_weights(save_directory, weight_name=weight_name, **arguments)

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        exact_unfuse: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Merge the active adapters (or `adapter_names`) into the weights of both transformers, times `lora_scale`.

        Args:
            components (`list[str]`, *optional*): default both transformers.
            lora_scale (`float`): multiplies the adapters' deltas.
            safe_fusing (`bool`): check the fused weights for NaN first.
            adapter_names (`list[str]`, *optional*): adapters to fuse; default the active ones.
            exact_unfuse (`bool`, defaults to False): keep a CPU copy of every weight about to change, so that
                `unfuse_lora` restores it bit for bit. It costs host memory the size of the targeted weights (about
                17 GB per bf16 transformer for a LoRA on every Linear); the default uses PEFT's unmerge, which
                subtracts the delta again and leaves rounding residue (README: "LoRA adapters"). Either way
                `unfuse_lora` restores every adapter's scaling (diffusers leaves all of them multiplied by
                `lora_scale`), and a weight keeps what its first fuse chose until it is unfused.
        """
        lora_scale = finite_float("lora_scale", lora_scale)
        components = list(COMPONENTS) if components is None else components
        self._check_adapter_names(adapter_names, components)
        quantized = [
            f"{component}.{name}"
            for component in components
            for name, layer in _tuner_layers(getattr(self, component, None)).items()
            # stored quantized (float8, or packed bytes): a LoRA delta cannot be added to it
            if keeps_stored_dtype(f"{name}.weight", layer.get_base_layer().weight.dtype)
        ]
        if quantized:
            raise ValueError(
                f"`fuse_lora` cannot fold adapters into quantized weight-only layers (fp8, nvfp4, GGUF, SDNQ): "
                f"{list_keys(quantized)}. Their weights stay quantized; run the adapters unfused (they apply at run "
                "time, `set_adapters` / `attention_kwargs` scale them), or load a bf16 checkpoint to fuse."
            )
        for component in components:
            _keep_unfused_state(getattr(self, component, None), adapter_names, exact=exact_unfuse)
        super().fuse_lora(
            components=components,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def _check_adapter_names(self, adapter_names, components=COMPONENTS) -> None:
        """Every named adapter is loaded in at least one of `components` (None: nothing to check)."""
        if adapter_names is None:
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = {name for c in components for name in getattr(getattr(self, c, None), "peft_config", {})}
        unknown = sorted(set(names) - loaded)
        if not names or unknown:
            raise ValueError(
                f"`adapter_names={adapter_names!r}`: {'no adapter named' if names else 'empty'} {unknown or ''}; "
                f"loaded adapters: {sorted(loaded)}. (`disable_lora()` turns every adapter off.)"
            )

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """diffusers' `set_adapters`, with the names and weights checked first: every name loaded, every weight a
        finite number (a float, a list with one per adapter, or dicts of them as diffusers allows)."""
        self._check_adapter_names(adapter_names)
        check_adapter_weights(adapter_weights)
        super().set_adapters(adapter_names, adapter_weights)

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undo `fuse_lora`: weights (and adapter scaling) are restored exactly as they were before fusing."""
        components = list(COMPONENTS) if components is None else components
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"`components` has {unknown}; LoRA-loadable components are {list(COMPONENTS)}.")
        # Only components with fused layers: PEFT warns for every layer that has nothing to unmerge.
        fused = [c for c in components if any(m.merged for m in _tuner_layers(getattr(self, c, None)).values())]
        if fused:
            super().unfuse_lora(components=fused, **kwargs)
        for component in components:  # scaling was changed in every LoRA layer, merged or not
            _restore_unfused_state(getattr(self, component, None))


def check_adapter_weights(weight, where: str = "adapter_weights") -> None:
    """Adapter weights as diffusers' `set_adapters` takes them (a float, a list with one per adapter, or dicts of
    them), every number finite."""
    if isinstance(weight, dict):
        for key, value in weight.items():
            check_adapter_weights(value, f"{where}[{key!r}]")
    elif isinstance(weight, (list, tuple)):
        for index, value in enumerate(weight):
            check_adapter_weights(value, f"{where}[{index}]")
    elif weight is not None:
        finite_float(where, weight)


def _check_peft_layers(component: str, state_dict: dict[str, torch.Tensor]) -> None:
    """The layers `save_lora_weights` writes must be an unprefixed PEFT state dict of the diffusers layout."""
    wrong = []
    for key in state_dict:
        suffix = PEFT_DOWN if key.endswith(PEFT_DOWN) else PEFT_UP if key.endswith(PEFT_UP) else None
        if suffix is None or not is_known_module(key[: -len(suffix)], diffusers_layout_only=True):
            wrong.append(key)
    if wrong:
        raise ValueError(
            f"`{component}_lora_layers` must be a PEFT state dict of the transformer "
            f"(`<module>.lora_A.weight` / `.lora_B.weight`, split attention, no prefix), as returned by "
            f"`peft.utils.get_peft_model_state_dict`; these keys are not: {list_keys(wrong)}. Convert other formats with "
            f"`convert_lora_state_dict(..., to='diffusers')`."
        )


def _check_loaded(component: str, model: nn.Module, modules: dict, adapter_name: str, kind: str, unexpected) -> None:
    """After PEFT's load: every module carries the adapter and every tensor was taken (diffusers only warns)."""
    absent = [
        f"{component}.{name}"
        for name in modules
        if adapter_name not in getattr(model.get_submodule(name), "scaling", {})
    ]
    raise_problems(
        f"PEFT did not load the whole {kind}.",
        key_problems({"modules without it": absent, "keys it did not take": unexpected}),
        ValueError,
    )


def _adapter_kind(config) -> str:
    return {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr"}.get(config.peft_type.value, config.peft_type.value)


def _tuner_layers(model: nn.Module | None) -> dict[str, BaseTunerLayer]:
    return {} if model is None else {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _keep_unfused_state(model: nn.Module | None, adapter_names: list[str] | None, exact: bool) -> None:
    """Before fusing: every LoRA layer's scaling (diffusers' fuse rescales all of them by `lora_scale`) and, with
    `exact`, a CPU copy of each weight about to change. A layer keeps the state of the first fuse until unfused."""
    for module in _tuner_layers(model).values():
        if hasattr(module, _UNFUSED_STATE):
            continue
        wanted = adapter_names if adapter_names is not None else module.active_adapters
        merging = any(adapter in module.scaling and adapter not in module.merged_adapters for adapter in wanted)
        weight = module.get_base_layer().weight
        copy = weight.detach().to("cpu", copy=True) if exact and merging and weight.is_floating_point() else None
        setattr(module, _UNFUSED_STATE, (copy, dict(module.scaling)))


def _restore_unfused_state(model: nn.Module | None) -> None:
    for module in _tuner_layers(model).values():
        state = getattr(module, _UNFUSED_STATE, None)
        if state is None or module.merged:
            continue
        copy, scaling = state
        if copy is not None:
            with torch.no_grad():
                module.get_base_layer().weight.copy_(copy)
        module.scaling.update(scaling)
        delattr(module, _UNFUSED_STATE)
