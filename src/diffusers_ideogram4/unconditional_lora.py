"""One resident transformer (SPEC 10): the unconditional branch as a LoRA on the conditional transformer, and adapters
scoped per branch.

Single-transformer mode. A pipeline without `unconditional_transformer` (`Ideogram4Pipeline.from_pretrained(repo,
unconditional_transformer=None)`, which never reads that component's weights) loads an unconditional LoRA with
`load_unconditional_lora` into `pipe.transformer`. Each denoising step then runs two passes on that one transformer:
- the conditional pass, on `[text | image]`, with the adapters the user made active (`set_adapters`), never the
  unconditional one;
- the unconditional pass, image tokens only and no text features, with the unconditional adapter active and, by
  default, no other (style LoRAs corrupt guidance there); it is skipped at steps whose guidance is 1.0.
`set_adapters(names, weights, branch=...)` scopes adapters explicitly: "conditional" (the default in this mode), "both"
or "unconditional".

Switching. PEFT's `set_adapter` walks every module and toggles `requires_grad` on every adapter parameter; here the
transformer's tuner layers are listed once (again only when its adapters change) and a pass sets their active
adapters directly, then puts each layer's own state back. An adapter has one weight (its PEFT scaling) in whichever
passes it runs. `attention_kwargs={"scale": s}` scales the conditional pass only: the unconditional pass runs the
model's other branch, not a style.

Weight differences outside the Linears. An unconditional LoRA made from the two transformers (`lora_extraction`) also
carries the differences of the weights a LoRA cannot hold: `<module>.diff` (RMSNorm and embedding weights) and
`<module>.diff_b` (Linear biases), full precision, with ComfyUI's key names. They are added to those modules' outputs
by forward hooks, during the unconditional pass only. The hooks need only the modules' inputs and outputs, so they hold
under every offload mode (model, group, per-module), whatever moves the weights.
"""

import re
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from .loading import key_problems, list_keys, raise_problems
from .lora import Ideogram4LoraLoaderMixin, base_layer, check_adapter_weights
from .lora_formats import BRANCH_PREFIXES, split_prefix
from .lora_trainers import parse_adapter_state_dict
from .transformer_ideogram4 import Ideogram4RMSNorm


BRANCHES = ("conditional", "unconditional", "both")
# The component that computes each pass when the pipeline has both transformers.
BRANCH_COMPONENTS = {"conditional": "transformer", "unconditional": "unconditional_transformer"}
DEFAULT_UNCONDITIONAL_ADAPTER = "unconditional"
# Full-precision differences of non-Linear weights in a LoRA file (ComfyUI's names), and what each one patches.
DIFF_SUFFIXES = {".diff": "weight", ".diff_b": "bias"}
# Where the state of single-transformer mode lives: on the transformer itself, so that every pipeline sharing it
# (`from_pipe`) runs the same branches.
_STATE_ATTRIBUTE = "_ideogram4_unconditional_branch"
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------------------------------
# Switching the active adapters of every tuner layer, cheaply


class AdapterSwitch:
    """The tuner layers of one model, listed once, whose active adapters a pass sets directly and puts back after.

    The list is rebuilt only when the model's adapters change (their names or configs), so a switch costs one
    attribute write per layer instead of PEFT's walk over every module and adapter parameter.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._key = None
        self._layers: list[BaseTunerLayer] = []

    def layers(self) -> list[BaseTunerLayer]:
        configs = getattr(self.model, "peft_config", None) or {}
        key = tuple((name, id(config)) for name, config in configs.items())
        if key != self._key:
            self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
            self._key = key
        return self._layers

    def disabled(self) -> bool:
        """Whether `disable_lora()` turned the adapters off."""
        return any(layer.disable_adapters for layer in self.layers())

    def running(self) -> list[str]:
        """The adapters the layers run now (none after `disable_lora()`)."""
        layers = self.layers()
        return [] if not layers or self.disabled() else list(layers[0].active_adapters)

    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers())

    @contextmanager
    def preserved(self):
        """Every layer's active adapters and disabled flag as they are now, put back when the block ends."""
        layers = self.layers()
        saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
        try:
            yield layers
        finally:  # only what changed is written back: a module attribute write is not free on 278 layers
            for layer, (active, disabled) in zip(layers, saved):
                if layer._active_adapter is not active:
                    layer._active_adapter = active
                if layer._disable_adapters != disabled:
                    layer._disable_adapters = disabled

    @contextmanager
    def activated(self, names: list[str]):
        """Within the block every layer runs exactly `names` (turned on even after `disable_lora()`)."""
        with self.preserved() as layers:
            for layer in layers:
                layer._active_adapter = names
                if layer._disable_adapters:
                    layer._disable_adapters = False
            yield

    @contextmanager
    def without(self, name: str):
        """Within the block no layer runs adapter `name`; every other active adapter keeps running."""
        layers = [layer for layer in self.layers() if name in layer.active_adapters]
        saved = [layer._active_adapter for layer in layers]
        try:
            for layer in layers:
                layer._active_adapter = [a for a in layer.active_adapters if a != name]
            yield
        finally:
            for layer, active in zip(layers, saved):
                layer._active_adapter = active


# --------------------------------------------------------------------------------------------------------------------
# Differences of non-Linear weights, applied in the unconditional pass


def split_weight_diffs(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, dict]]:
    """-> (the LoRA keys, {module (prefix removed): {"weight" | "bias": (key, tensor)}} of the `.diff` / `.diff_b`
    keys). A difference given twice (one module under two prefixes) is refused, naming both keys."""
    lora, diffs, repeated = {}, defaultdict(dict), []
    for key, tensor in state_dict.items():
        suffix = next((s for s in DIFF_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            lora[key] = tensor
            continue
        module, part = split_prefix(key[: -len(suffix)])[1], DIFF_SUFFIXES[suffix]
        if part in diffs[module]:
            repeated.append(f"{key} (and {diffs[module][part][0]})")
        else:
            diffs[module][part] = (key, tensor)
    raise_problems(
        "The LoRA file is malformed; nothing was loaded.",
        key_problems({"weight differences given twice": repeated}),
        ValueError,
    )
    return lora, dict(diffs)


def check_weight_diffs(model: nn.Module, diffs: dict[str, dict[str, tuple[str, torch.Tensor]]]) -> dict:
    """Check `.diff` / `.diff_b` tensors (module names without prefix) against the model -> {module: {"weight" |
    "bias": float32 tensor}}. Raises a ValueError naming every key whose module is missing, of a kind a difference
    cannot patch (a Linear weight: that is what LoRA factors are for), or whose tensor has another shape, is not a
    float, or holds NaN / inf."""
    found = dict(model.named_modules())
    problems, checked = [], defaultdict(dict)
    for name, parts in sorted(diffs.items()):
        module = base_layer(found[name]) if name in found else None
        for part, (key, tensor) in sorted(parts.items()):
            patched = None if module is None else getattr(module, part, None)
            if module is None:
                problems.append(f"`{key}`: the model has no module `{name}`")
            elif part == "weight" and not isinstance(module, (Ideogram4RMSNorm, nn.Embedding)):
                kind = "a Linear weight (LoRA factors hold those)" if isinstance(module, nn.Linear) else type(module)
                problems.append(f"`{key}`: `{name}` is {kind}; `.diff` patches RMSNorm and embedding weights")
            elif part == "bias" and not (isinstance(module, nn.Linear) and isinstance(patched, torch.Tensor)):
                problems.append(f"`{key}`: `{name}` is not a Linear with a bias")
            elif not tensor.is_floating_point() or tuple(tensor.shape) != tuple(patched.shape):
                problems.append(
                    f"`{key}`: {tensor.dtype} {list(tensor.shape)}, the model's {part} is {list(patched.shape)} floats"
                )
            elif not bool(torch.isfinite(tensor).all()):
                problems.append(f"`{key}` holds NaN or infinite values")
            else:
                checked[name][part] = tensor.float()
    raise_problems(
        "The unconditional LoRA's weight differences do not fit the model; nothing was loaded.", problems, ValueError
    )
    return dict(checked)


class WeightDiffs:
    """Forward hooks adding the differences of RMSNorm / embedding weights and Linear biases to those modules'
    outputs while `active` (the unconditional pass). Each hook uses only its module's input and output, so weights
    that an offload hook moves, or has already moved away again, are never read."""

    def __init__(self, model: nn.Module, diffs: dict[str, dict[str, torch.Tensor]]) -> None:
        self.active = False
        self.diffs = diffs
        self._cache: dict[tuple[str, str, torch.device, torch.dtype], torch.Tensor] = {}
        self._handles = []
        for name, parts in diffs.items():
            module = base_layer(model.get_submodule(name))
            self._handles.append(module.register_forward_hook(self._hook(name, parts)))

    def _on(self, name: str, part: str, like: torch.Tensor) -> torch.Tensor:
        """The difference on `like`'s device and dtype, converted once per device and dtype."""
        key = (name, part, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.diffs[name][part].to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _hook(self, name: str, parts: dict[str, torch.Tensor]):
        def add_difference(module, inputs, output):
            if not self.active:
                return None
            if "bias" in parts:  # a Linear: W x + b + db
                return output + self._on(name, "bias", output)
            if isinstance(module, nn.Embedding):  # rows of (E + dE)
                return output + F.embedding(inputs[0], self._on(name, "weight", output))
            # Ideogram4RMSNorm: normalised(x) * (w + dw), the normalisation as the module computes it
            hidden_states = inputs[0]
            normalised = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=module.eps)
            return torch.addcmul(output, normalised.to(output.dtype), self._on(name, "weight", output))

        return add_difference

    @contextmanager
    def applied(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._cache.clear()


@dataclass
class UnconditionalBranch:
    """Single-transformer mode on one transformer: its unconditional adapter, the adapters of the unconditional pass
    (the unconditional one and those scoped there), the switch, and the weight differences (or None)."""

    adapter: str
    switch: AdapterSwitch
    diffs: WeightDiffs | None = None
    unconditional_pass: list[str] = field(default_factory=list)

    def remove(self) -> None:
        if self.diffs is not None:
            self.diffs.remove()


# --------------------------------------------------------------------------------------------------------------------
# The pipeline mixin


class Ideogram4UnconditionalLoraMixin(Ideogram4LoraLoaderMixin):
    r"""
    `Ideogram4LoraLoaderMixin` with single-transformer mode (`load_unconditional_lora`,
    `unload_unconditional_lora`, `unconditional_adapter`) and adapters scoped per branch
    (`set_adapters(..., branch=)`, `get_branch_adapters`). The denoising loop asks `branch_pass(branch)` for the model
    of each pass.
    """

    # ----------------------------------------------------------------------------------------------------------------
    # State

    def _unconditional_branch(self) -> UnconditionalBranch | None:
        return getattr(getattr(self, "transformer", None), _STATE_ATTRIBUTE, None)

    @property
    def unconditional_adapter(self) -> str | None:
        """The name of the adapter `load_unconditional_lora` loaded into `transformer`, or None."""
        state = self._unconditional_branch()
        return None if state is None else state.adapter

    def check_unconditional_branch(self) -> bool:
        """Whether the pipeline computes an unconditional pass (an `unconditional_transformer`, or the unconditional
        LoRA on `transformer`); raises a ValueError, before any model work, when single-transformer mode cannot run
        as it should."""
        state = self._unconditional_branch()
        if state is None:
            return getattr(self, "unconditional_transformer", None) is not None
        if getattr(self, "unconditional_transformer", None) is not None:
            raise ValueError(
                f"This pipeline has both an `unconditional_transformer` and the unconditional LoRA {state.adapter!r} "
                "on `transformer`; which one computes the unconditional pass is ambiguous. Drop one: "
                "`pipe.unconditional_transformer = None`, or `pipe.unload_unconditional_lora()`."
            )
        if state.adapter not in (getattr(self.transformer, "peft_config", None) or {}):
            raise ValueError(
                f"The unconditional LoRA {state.adapter!r} is no longer loaded in `transformer` (deleted through the "
                "transformer itself?). Call `pipe.unload_unconditional_lora()` to leave single-transformer mode, or "
                "load it again with `load_unconditional_lora`."
            )
        if state.switch.merged():
            raise ValueError(
                "An adapter was fused into `transformer`'s weights, which both passes share in single-transformer "
                "mode, so it would run in the unconditional pass too. Unfuse it (`pipe.transformer.unfuse_lora()`)."
            )
        return True

    @property
    def unconditional_model(self):
        """The transformer that computes the unconditional pass: `unconditional_transformer`, or `transformer` in
        single-transformer mode; None for a single-branch (CFG-distilled) pipeline."""
        if self._unconditional_branch() is not None:
            return self.transformer
        return getattr(self, "unconditional_transformer", None)

    @contextmanager
    def branch_pass(self, branch: str):
        """The model that computes `branch`'s velocity ("conditional" or "unconditional"), set up for that pass: in
        single-transformer mode `transformer` with the pass's adapters (and, for the unconditional pass, the weight
        differences and no runtime LoRA scale); otherwise `transformer` or `unconditional_transformer` as they are."""
        if branch not in BRANCH_COMPONENTS:
            raise ValueError(f"`branch={branch!r}`: a pass is 'conditional' or 'unconditional'.")
        state = self._unconditional_branch()
        if state is None:
            yield getattr(self, BRANCH_COMPONENTS[branch])
            return
        if branch == "conditional":
            with state.switch.without(state.adapter):
                yield self.transformer
            return
        names = [state.adapter] if state.switch.disabled() else list(state.unconditional_pass)
        attention_kwargs = getattr(self, "_attention_kwargs", None)
        self._attention_kwargs = None  # `{"scale": s}` is for the conditional pass
        try:
            with state.switch.activated(names), state.diffs.applied() if state.diffs is not None else nullcontext():
                yield self.transformer
        finally:
            self._attention_kwargs = attention_kwargs

    # ----------------------------------------------------------------------------------------------------------------
    # Loading and unloading

    def load_unconditional_lora(
        self,
        pretrained_model_name_or_path_or_dict,
        weight_name: str | None = None,
        adapter_name: str = DEFAULT_UNCONDITIONAL_ADAPTER,
        low_cpu_mem_usage: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Load an unconditional LoRA into `transformer` and run the unconditional pass on it (single-transformer mode):
        one resident transformer instead of two.

        Args:
            pretrained_model_name_or_path_or_dict: a hub repo id, a folder, a `.safetensors` file or a state dict, in
                any LoRA format `load_lora_weights` reads (ai-toolkit's `diffusion_model.` keys with fused attention and
                lora_down / lora_up / alpha, diffusers / PEFT, kohya, LoHa, LoKr). Keys without a branch prefix, or
                prefixed `unconditional_transformer.`; `.diff` / `.diff_b` weight differences (as
                `conversion/extract_unconditional_lora.py` writes them) are applied in the unconditional pass.
            weight_name (`str`, *optional*): the file in a folder or repo.
            adapter_name (`str`, defaults to "unconditional"): the adapter's name in `transformer`.
            low_cpu_mem_usage (`bool`): let PEFT skip the random initialisation of the LoRA layers.
            subfolder, cache_dir, revision, token, local_files_only, force_download, proxies: where to find the file.
                metadata: diffusers' LoRA metadata that goes with a state dict passed in memory.

        The pipeline must have no `unconditional_transformer`: load it with
        `Ideogram4Pipeline.from_pretrained(repo, unconditional_transformer=None)` (or set
        `pipe.unconditional_transformer = None`). The conditional pass never runs this adapter; other adapters stay
        out of the unconditional pass unless `set_adapters(..., branch="both" | "unconditional")` puts them there.
        Every problem raises a ValueError before the model is touched.
        """
        if getattr(self, "transformer", None) is None:
            raise ValueError("This pipeline has no `transformer` to load the unconditional LoRA into.")
        if getattr(self, "unconditional_transformer", None) is not None:
            raise ValueError(
                "This pipeline has an `unconditional_transformer`, which computes the unconditional pass; the "
                "unconditional LoRA replaces it. Load the pipeline without it, "
                "`Ideogram4Pipeline.from_pretrained(repo, unconditional_transformer=None)` (its weights are then never "
                "read), or drop it with `pipe.unconditional_transformer = None`; then load the LoRA."
            )
        if self.unconditional_adapter is not None:
            raise ValueError(
                f"The unconditional LoRA {self.unconditional_adapter!r} is already loaded; "
                "`pipe.unload_unconditional_lora()` first to load another."
            )
        if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
            raise ValueError(
                f"`adapter_name={adapter_name!r}` must be a non-empty name of letters, digits, `_`, `.` and `-`."
            )
        if adapter_name in (getattr(self.transformer, "peft_config", None) or {}):
            raise ValueError(
                f"An adapter named {adapter_name!r} is already loaded in `transformer`; pass another `adapter_name`, "
                f"or `delete_adapters({adapter_name!r})` first."
            )
        switch = AdapterSwitch(self.transformer)
        if switch.merged():
            raise ValueError(
                "An adapter is fused into `transformer`'s weights; in single-transformer mode both passes share them, "
                "so it would run in the unconditional pass too. `unfuse_lora()` first."
            )
        state_dict, metadata = self._read_lora(
            pretrained_model_name_or_path_or_dict, weight_name=weight_name, **kwargs
        )
        lora_keys, module_diffs = split_weight_diffs(state_dict)
        _check_unconditional_prefixes(state_dict)
        if not lora_keys:
            raise ValueError(
                "The unconditional LoRA holds no LoRA factors (only weight differences); nothing was loaded."
            )
        diffs = check_weight_diffs(self.transformer, module_diffs)
        target = "unconditional_transformer"
        # the unconditional branch, loaded into the one transformer
        components = {"transformer": parse_adapter_state_dict(lora_keys, metadata, target)[target]}
        with switch.preserved() as before:  # the conditional pass keeps the adapters it had
            common = list(before[0].active_adapters) if before else []
            self._load_parsed_lora(components, adapter_name, False, low_cpu_mem_usage)
        for layer in switch.layers():  # layers that PEFT wrapped for this adapter alone
            if adapter_name in layer.active_adapters:
                layer._active_adapter = [a for a in common if a != adapter_name]
        # check_weight_diffs found every module: registering the hooks cannot fail
        weight_diffs = WeightDiffs(self.transformer, diffs) if diffs else None
        state = UnconditionalBranch(adapter_name, switch, weight_diffs, [adapter_name])
        setattr(self.transformer, _STATE_ATTRIBUTE, state)

    def unload_unconditional_lora(self) -> None:
        """Leave single-transformer mode: the unconditional adapter and its weight differences are removed, and the
        pipeline runs one branch again (guidance 1.0, the `distilled` preset) until an unconditional LoRA or an
        `unconditional_transformer` is loaded. Other adapters stay."""
        state = self._unconditional_branch()
        if state is None:
            raise ValueError("No unconditional LoRA is loaded (`load_unconditional_lora` loads one).")
        state.remove()
        delattr(self.transformer, _STATE_ATTRIBUTE)
        if state.adapter in (getattr(self.transformer, "peft_config", None) or {}):
            self.transformer.delete_adapters(state.adapter)

    def save_lora_adapter(self, save_directory, adapter_name: str, weight_name: str | None = None) -> None:
        """`Ideogram4LoraLoaderMixin.save_lora_adapter`; the unconditional adapter saves as the conditional
        transformer's LoRA (`transformer.` keys), which `load_unconditional_lora` reads back. One with weight
        differences is refused: the diffusers format has no place for them."""
        state = self._unconditional_branch()
        if state is not None and adapter_name == state.adapter and state.diffs is not None:
            raise ValueError(
                f"The unconditional LoRA {adapter_name!r} carries weight differences ({len(state.diffs.diffs)} "
                "modules' `.diff` / `.diff_b`), which the diffusers LoRA format cannot hold; keep the file it was "
                "loaded from."
            )
        super().save_lora_adapter(save_directory, adapter_name, weight_name=weight_name)

    def delete_adapters(self, adapter_names) -> None:
        """diffusers' `delete_adapters`; deleting the unconditional adapter is `unload_unconditional_lora()`."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_adapter_names(names)
        if self.unconditional_adapter in names:
            names.remove(self.unconditional_adapter)
            self.unload_unconditional_lora()
        if names:
            super().delete_adapters(names)

    def unload_lora_weights(self) -> None:
        """diffusers' `unload_lora_weights`: every adapter goes, the unconditional one included (single-transformer
        mode ends)."""
        state = self._unconditional_branch()
        if state is not None:
            state.remove()
            delattr(self.transformer, _STATE_ATTRIBUTE)
        super().unload_lora_weights()

    # ----------------------------------------------------------------------------------------------------------------
    # Adapters per branch

    def set_adapters(self, adapter_names, adapter_weights=None, branch: str | None = None) -> None:
        r"""
        Make `adapter_names` the active adapters of a branch, with `adapter_weights` (a float, one per adapter, or
        diffusers' dicts), every name loaded and every weight finite.

        Args:
            branch (`str`, *optional*): which pass runs exactly these adapters.
                - "conditional": the conditional pass (`transformer`).
                - "unconditional": the unconditional pass (`unconditional_transformer`, or in single-transformer mode
                  `transformer` with the unconditional adapter, which must be among the names).
                - "both": both passes (in single-transformer mode the unconditional adapter keeps running in the
                  unconditional pass, and must not be named).
                - None (default): "conditional" in single-transformer mode, so that style LoRAs stay out of the
                  unconditional pass; with two transformers diffusers' behaviour, each transformer running the named
                  adapters it holds.
        In single-transformer mode an adapter has one weight in whichever passes run it.
        """
        if branch is not None and branch not in BRANCHES:
            raise ValueError(f"`branch={branch!r}` is not a branch; use one of {list(BRANCHES)} (or None).")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        state = self._unconditional_branch()
        if state is None:
            if branch in (None, "both"):
                super().set_adapters(names, adapter_weights)
                return
            component = BRANCH_COMPONENTS[branch]
            model = getattr(self, component, None)
            if model is None:
                raise ValueError(
                    f"`branch={branch!r}`: this pipeline has no `{component}` (and no unconditional LoRA); load one, "
                    "or pass `branch='conditional'`."
                )
            loaded = sorted(getattr(model, "peft_config", None) or {})
            missing = [name for name in names if name not in loaded]
            if not names or missing:
                raise ValueError(
                    f"`adapter_names={adapter_names!r}`: {missing or 'no names'} not loaded in `{component}`, which "
                    f"holds {loaded}."
                )
            check_adapter_weights(adapter_weights)
            model.set_adapters(names, adapter_weights)
            return
        branch = branch or "conditional"
        if branch == "unconditional" and state.adapter not in names:
            raise ValueError(
                f"`branch='unconditional'`: the unconditional pass runs on the unconditional LoRA {state.adapter!r}; "
                f"name it among `adapter_names` (e.g. {[state.adapter, *names]!r}), or leave single-transformer mode "
                "with `unload_unconditional_lora()`."
            )
        if branch != "unconditional" and state.adapter in names:
            raise ValueError(
                f"`adapter_names` names the unconditional LoRA {state.adapter!r}, which runs in the unconditional pass "
                f"only; set its weight with `set_adapters([{state.adapter!r}, ...], weights, branch='unconditional')`."
            )
        # For the unconditional pass only the weights change: the conditional pass keeps its adapters.
        with state.switch.preserved() if branch == "unconditional" else nullcontext():
            super().set_adapters(names, adapter_weights)
        if branch != "conditional":
            state.unconditional_pass = names if branch == "unconditional" else [state.adapter, *names]

    def get_branch_adapters(self) -> dict[str, list[str]]:
        """The adapters each pass runs: `{"conditional": [...], "unconditional": [...]}` (none after `disable_lora()`,
        but the unconditional adapter, which is the unconditional branch itself)."""
        state = self._unconditional_branch()
        if state is None:
            models = {branch: getattr(self, component, None) for branch, component in BRANCH_COMPONENTS.items()}
            return {
                branch: [] if model is None else AdapterSwitch(model).running() for branch, model in models.items()
            }
        return {
            "conditional": [a for a in state.switch.running() if a != state.adapter],
            "unconditional": [state.adapter] if state.switch.disabled() else list(state.unconditional_pass),
        }

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, **kwargs) -> None:
        """Refused in single-transformer mode (see `Ideogram4LoraLoaderMixin.fuse_lora` otherwise)."""
        state = self._unconditional_branch()
        if state is not None:
            raise ValueError(
                "`fuse_lora` is not available in single-transformer mode: both passes run `transformer`'s weights, so "
                "a fused style LoRA would run in the unconditional pass (corrupting guidance) and a fused unconditional "
                f"LoRA {state.adapter!r} in the conditional one. The adapters run unfused here; "
                "`unload_unconditional_lora()` first to fuse."
            )
        super().fuse_lora(components=components, lora_scale=lora_scale, **kwargs)


def _check_unconditional_prefixes(keys) -> None:
    """An unconditional LoRA's keys name no branch or the unconditional one, never the conditional one or both."""
    prefixes = {split_prefix(key)[0] for key in keys}
    conditional = sorted(p for p in prefixes if BRANCH_PREFIXES.get(p) == "transformer")
    mixed = "unconditional_transformer." in prefixes and len(prefixes) > 1
    if conditional or mixed:
        shown = conditional or sorted(prefixes)
        named = [key for key in keys if split_prefix(key)[0] in shown]
        raise ValueError(
            f"This is not an unconditional LoRA: its keys name the conditional branch or both branches (prefixes "
            f"{shown}, e.g. {list_keys(named[:3])}). Load it with `load_lora_weights`, or give "
            "`load_unconditional_lora` a file without branch prefixes or prefixed `unconditional_transformer.`."
        )
