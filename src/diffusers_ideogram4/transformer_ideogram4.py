"""The Ideogram 4 single-stream diffusion transformer (SPEC 2).

Read top to bottom: rotary embedding -> attention -> block -> timestep embedding -> final layer -> model.
Shapes use B = batch, L = packed sequence length (text + image), D = hidden size, H = heads, Dh = head dim.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers

from .constants import IMAGE_INDICATOR, TEXT_INDICATOR
from .fp8 import ComputeDtypeMixin
from .layout import segment_attention_mask
from .loading import HUB_DOWNLOAD_KWARGS, load_pretrained, original_key_plan
from .validation import finite_float


# Timesteps in [0, 1] are stretched to [0, TIMESTEP_SCALE] before the sinusoid.
TIMESTEP_SCALE = 1e4
TEXT_NORM_EPS = 1e-6
FINAL_NORM_EPS = 1e-6
# The only key `attention_kwargs` may carry: the LoRA scale.
SUPPORTED_ATTENTION_KWARGS = ("scale",)
# The arguments of diffusers' `ModelMixin.from_pretrained` this class takes; any other is refused (diffusers would
# only warn and ignore it).
LOADING_KWARGS = (
    *HUB_DOWNLOAD_KWARGS,
    *"subfolder dtype torch_dtype device_map max_memory offload_folder offload_state_dict quantization_config".split(),
    *"variant use_safetensors low_cpu_mem_usage disable_mmap use_flashpack output_loading_info".split(),
)


class Ideogram4RMSNorm(nn.Module):
    """RMSNorm normalised in float32, then scaled by its weight in the activation dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        return normed.to(hidden_states.dtype) * self.weight.to(hidden_states.dtype)


def mrope_axis_of_slot(head_dim: int, mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the head_dim // 2 frequency slots.

    Interleaved, not blocked: slot j takes h when j = 1 mod 3 and w when j = 2 mod 3, for j below 3 * section;
    every other slot takes t.
    """
    axis = torch.zeros(head_dim // 2, dtype=torch.long)
    for axis_index in (1, 2):
        axis[axis_index : 3 * mrope_section[axis_index] : 3] = axis_index
    return axis


class Ideogram4MRoPE(nn.Module):
    """Multi-axis rotary embedding. Angles are computed in float32 with autocast off: image positions sit near
    65536, where bfloat16 cannot tell neighbouring integers apart and the image comes out flat."""

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("axis_of_slot", mrope_axis_of_slot(head_dim, mrope_section), persistent=False)

    def inv_freq(self, device) -> torch.Tensor:
        """(Dh/2,) float32 frequencies. Computed on the fly, not stored: a float buffer would be rounded to bfloat16
        by `model.to(torch.bfloat16)`."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L, 3) -> cos, sin (B, L, Dh) in float32."""
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            positions = position_ids.float()[..., self.axis_of_slot]  # (B, L, Dh/2)
            angles = positions * self.inv_freq(position_ids.device)
            angles = torch.cat((angles, angles), dim=-1)  # (B, L, Dh)
            return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (B, L, H, Dh) with cos/sin (B, L, 1, Dh)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


# Attention backends of diffusers' dispatcher that apply a dense boolean (B, 1, L, L) mask as given: the SDPA family
# and flex (which builds a block mask from it), and the NPU kernel (read from its source, not run here). Every other
# backend either refuses a mask or reduces it to key padding, which drops the segment mask (the varlen kernels keep
# "any query attends this key", all True here, and xformers adds the booleans as a 0/1 bias).
MASKED_ATTENTION_BACKENDS = (
    AttentionBackendName.NATIVE,
    AttentionBackendName._NATIVE_MATH,
    AttentionBackendName._NATIVE_EFFICIENT,
    AttentionBackendName._NATIVE_CUDNN,
    AttentionBackendName._NATIVE_NPU,
    AttentionBackendName.FLEX,
)


def check_mask_support(backend: AttentionBackendName | None, parallel_config) -> None:
    """Refuse, by name, an attention setting that cannot apply the segment mask of a padded batch: a backend outside
    MASKED_ATTENTION_BACKENDS, or ring attention (its kernels get the whole mask with a chunk of the keys)."""
    backend = backend or _AttentionBackendRegistry.get_active_backend()[0]
    if not isinstance(backend, AttentionBackendName):  # a name set on a processor by hand
        backend = AttentionBackendName(backend)
    if backend not in MASKED_ATTENTION_BACKENDS:
        raise ValueError(
            f"Attention backend `{backend.value}` cannot apply Ideogram 4's boolean segment mask (it refuses a mask, or "
            "reduces it to key padding and so drops it), and this batch needs the mask: its sequences hold padding "
            "(prompts of different token lengths, or padding to a length context parallelism can split). Use one of "
            f"{[name.value for name in MASKED_ATTENTION_BACKENDS]} (`transformer.set_attention_backend(...)`), or "
            "batch prompts of equal token length (one prompt per call needs no mask without context parallelism)."
        )
    context_parallel = getattr(parallel_config, "context_parallel_config", None)
    if context_parallel is not None and context_parallel.ring_degree > 1:
        processes = context_parallel.ring_degree * context_parallel.ulysses_degree
        raise ValueError(
            f"Ring attention (`ContextParallelConfig(ring_degree={context_parallel.ring_degree})`) cannot apply "
            "Ideogram 4's segment mask, and this batch needs it: its sequences hold padding (prompts of different "
            f"token lengths, or padding to a length {processes} processes can split). Use Ulysses "
            f"(`ulysses_degree=`), or batch prompts of equal token length whose sequence is a multiple of {processes} "
            "tokens long."
        )


class Ideogram4AttnProcessor:
    """q/k/v projections (one fused matmul after `fuse_qkv_projections`), per-head RMSNorm on q and k, RoPE, then
    diffusers' `dispatch_attention_fn` (the kernel chosen by `set_attention_backend`, split over processes by
    `enable_parallelism`), then the output projection."""

    _attention_backend = None  # set by `set_attention_backend`; None follows diffusers' active backend
    _parallel_config = None  # set by `enable_parallelism`

    def __call__(
        self,
        attn: "Ideogram4Attention",
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden_states (B, L, D), rotary cos/sin (B, L, 1, Dh), attention_mask (B, 1, L, L) bool or None."""
        if attention_mask is not None:
            check_mask_support(self._attention_backend, self._parallel_config)
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = (attn.num_heads, attn.head_dim)
        query = attn.norm_q(query.unflatten(-1, heads))  # (B, L, H, Dh)
        key = attn.norm_k(key.unflatten(-1, heads))
        value = value.unflatten(-1, heads)
        cos, sin = rotary
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        attended = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )  # (B, L, H, Dh)
        return attn.to_out[0](attended.flatten(2))


def unfusable_reason(linear: nn.Module) -> str | None:
    """Why a q/k/v projection cannot be fused into one matmul, or None: only a plain float nn.Linear with its weight
    in memory and no hooks can (a LoRA layer would be bypassed, a quantized or fp8 weight cannot be concatenated)."""
    if type(linear) is not nn.Linear:
        return f"is a {type(linear).__module__}.{type(linear).__name__} (LoRA adapter, quantized or fp8 layer)"
    weight = linear.weight
    if type(weight) is not nn.Parameter or not weight.dtype.is_floating_point or weight.dtype.itemsize < 2:
        return f"holds a {type(weight).__name__} of dtype {weight.dtype} (quantized or stored in low precision)"
    diffusers_hooks = getattr(getattr(linear, "_diffusers_hook", None), "_hook_order", None)
    if weight.device.type == "meta" or hasattr(linear, "_hf_hook") or diffusers_hooks:
        return "carries offload or casting hooks"
    return None


class Ideogram4Attention(nn.Module, AttentionModuleMixin):
    """Self-attention: q/k/v projections, per-head RMSNorm on q and k before RoPE, attention, output projection. The
    maths lives in the processor (`Ideogram4AttnProcessor`), so that diffusers' attention switches apply."""

    _default_processor_cls = Ideogram4AttnProcessor
    _available_processors = [Ideogram4AttnProcessor]

    def __init__(self, hidden_size: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_k = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_v = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm_q = Ideogram4RMSNorm(self.head_dim, eps=eps)
        self.norm_k = Ideogram4RMSNorm(self.head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(hidden_size, hidden_size, bias=False)])
        self.set_processor(self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden_states (B, L, D), rotary cos/sin (B, L, 1, Dh), attention_mask (B, 1, L, L) bool or None."""
        return self.processor(self, hidden_states, rotary, attention_mask)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Replace to_q, to_k and to_v by one `to_qkv` whose rows are [q; k; v] (one matmul instead of three; the
        three layers are removed, so the fused model holds no second copy). `unfuse_projections` undoes it exactly."""
        if self.fused_projections:
            return
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3 D, D)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        self._replace_projections({"to_qkv": fused}, removed=("to_q", "to_k", "to_v"))
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self) -> None:
        """Split `to_qkv` back into to_q, to_k and to_v (a lossless row split)."""
        if not self.fused_projections:
            return
        split = {}
        for name, rows in zip(("to_q", "to_k", "to_v"), self.to_qkv.weight.chunk(3)):
            split[name] = nn.Linear(rows.shape[1], rows.shape[0], bias=False, device=rows.device, dtype=rows.dtype)
            split[name].weight.copy_(rows)
        self._replace_projections(split, removed=("to_qkv",))
        self.fused_projections = False

    def _replace_projections(self, added: dict[str, nn.Module], removed: tuple[str, ...]) -> None:
        """Swap projection layers, the new ones first among the children (where to_q, to_k, to_v were), so that
        the state dict keeps the checkpoint's key order after a fuse and unfuse."""
        others = {name: module for name, module in self._modules.items() if name not in removed}
        self._modules.clear()
        self._modules.update({**added, **others})


class Ideogram4FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(hidden_states)) * self.w3(hidden_states))


class Ideogram4TransformerBlock(nn.Module):
    """Sandwich-normed attention and SwiGLU, each scaled by (1 + s) and gated by tanh(g) from the timestep."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, adaln_dim: int, eps: float) -> None:
        super().__init__()
        self.attention = Ideogram4Attention(hidden_size, num_heads, eps=eps)
        self.feed_forward = Ideogram4FeedForward(hidden_size, intermediate_size)
        self.attention_norm1 = Ideogram4RMSNorm(hidden_size, eps=eps)
        self.attention_norm2 = Ideogram4RMSNorm(hidden_size, eps=eps)
        self.ffn_norm1 = Ideogram4RMSNorm(hidden_size, eps=eps)
        self.ffn_norm2 = Ideogram4RMSNorm(hidden_size, eps=eps)
        self.adaln_modulation = nn.Linear(adaln_dim, 4 * hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        adaln_input: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden_states (B, L, D), adaln_input (B, 1, adaln_dim) -> (B, L, D)."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaln_modulation(adaln_input).chunk(4, dim=-1)
        attended = self.attention(self.attention_norm1(hidden_states) * (1 + scale_msa), rotary, attention_mask)
        hidden_states = hidden_states + torch.tanh(gate_msa) * self.attention_norm2(attended)
        fed = self.feed_forward(self.ffn_norm1(hidden_states) * (1 + scale_mlp))
        return hidden_states + torch.tanh(gate_mlp) * self.ffn_norm2(fed)


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) float32 [sin | cos] of TIMESTEP_SCALE * t."""
    half = dim // 2
    # Same operation order as the trained model: the float32 exponent must match to the last ulp, since the angles
    # reach 1e4 radians.
    step = math.log(TIMESTEP_SCALE) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=timestep.device) * -step)
    angles = (TIMESTEP_SCALE * timestep.float())[..., None] * frequencies
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Ideogram4TimestepEmbedding(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(hidden_size, hidden_size, bias=True)
        self.mlp_out = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The time is rounded to the compute dtype before the sinusoid, as the model was trained.
        embedding = timestep_sinusoid(timestep.to(dtype), self.mlp_in.in_features).to(dtype)
        return self.mlp_out(F.silu(self.mlp_in(embedding)))


class Ideogram4FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, adaln_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=FINAL_NORM_EPS, elementwise_affine=False)
        self.adaln_modulation = nn.Linear(adaln_dim, hidden_size, bias=True)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)

    def forward(self, hidden_states: torch.Tensor, adaln_input: torch.Tensor) -> torch.Tensor:
        # adaln_input already went through one SiLU; the trained model applies a second one here.
        scale = 1 + self.adaln_modulation(F.silu(adaln_input))
        return self.linear(self.norm_final(hidden_states) * scale)


class Ideogram4Transformer2DModel(
    ComputeDtypeMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin, CacheMixin
):
    r"""
    The Ideogram 4 diffusion transformer: one stream of `[text | image]` tokens, 34 blocks, flow-matching velocity.

    Loads the diffusers checkpoint layout (split `to_q/to_k/to_v/to_out.0`) and the original release layout (fused
    `attention.qkv` / `attention.o`) through `from_pretrained`, strictly: a missing, unexpected or mis-shaped key
    raises and names it.

    diffusers' switches apply: `set_attention_backend` / `attn_processors` / `fuse_qkv_projections` (attention runs
    through `dispatch_attention_fn`), `enable_cache` (the blocks are registered for the cache hooks),
    `compile_repeated_blocks`, and `enable_parallelism` with Ulysses context parallelism (`_cp_plan`).

    Args:
        in_channels (`int`, defaults to 128): channels of one image token (32 latent channels x 2 x 2 patch).
        num_layers (`int`, defaults to 34): transformer blocks.
        attention_head_dim (`int`, defaults to 256): width of one attention head.
        num_attention_heads (`int`, defaults to 18): heads; hidden size = heads x head width (4608).
        intermediate_size (`int`, defaults to 12288): SwiGLU hidden width.
        adaln_dim (`int`, defaults to 512): width of the timestep conditioning fed to every modulation.
        llm_features_dim (`int`, defaults to 53248): text feature width, 13 tapped layers x 4096.
        rope_theta (`int`, defaults to 5_000_000): MRoPE base.
        mrope_section (`tuple[int, int, int]`, defaults to (24, 20, 20)): frequency slots of the (t, h, w) axes;
            h and w take 20 interleaved slots each, t the rest.
        norm_eps (`float`, defaults to 1e-5): epsilon of the RMSNorms inside the blocks.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["Ideogram4TransformerBlock"]
    _repeated_blocks = ["Ideogram4TransformerBlock"]
    _skip_layerwise_casting_patterns = ["t_embedding", "adaln_proj", "embed_image_indicator", "norm"]
    # Context parallelism splits the sequence after the embeddings: the rotary tables and the residual stream entering
    # the first block are split along L, the final layer's output gathered. The (B, 1, L, L) mask and the (B, 1, .)
    # timestep conditioning stay whole; the embeddings run whole on every process (cheap next to the blocks).
    _cp_plan = {
        "rotary_emb": {
            0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True),  # cos (B, L, Dh)
            1: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True),  # sin (B, L, Dh)
        },
        "layers.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "final_layer": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    @register_to_config
    def __init__(
        self,
        in_channels: int = 128,
        num_layers: int = 34,
        attention_head_dim: int = 256,
        num_attention_heads: int = 18,
        intermediate_size: int = 12288,
        adaln_dim: int = 512,
        llm_features_dim: int = 53248,
        rope_theta: int = 5_000_000,
        mrope_section: tuple[int, int, int] = (24, 20, 20),
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if attention_head_dim % 2:
            raise ValueError(f"`attention_head_dim` must be even for rotary embeddings, got {attention_head_dim}.")
        mrope_section = tuple(mrope_section)
        if len(mrope_section) != 3 or 3 * max(mrope_section[1:]) > attention_head_dim // 2:
            raise ValueError(
                f"`mrope_section` {mrope_section} does not fit `attention_head_dim` {attention_head_dim}: give three "
                f"numbers (t, h, w) with 3 * max(h, w) <= attention_head_dim // 2."
            )
        hidden_size = attention_head_dim * num_attention_heads
        self.gradient_checkpointing = False

        self.input_proj = nn.Linear(in_channels, hidden_size, bias=True)
        self.llm_cond_norm = Ideogram4RMSNorm(llm_features_dim, eps=TEXT_NORM_EPS)
        self.llm_cond_proj = nn.Linear(llm_features_dim, hidden_size, bias=True)
        self.embed_image_indicator = nn.Embedding(2, hidden_size)
        self.t_embedding = Ideogram4TimestepEmbedding(hidden_size)
        self.adaln_proj = nn.Linear(hidden_size, adaln_dim, bias=True)
        self.rotary_emb = Ideogram4MRoPE(attention_head_dim, rope_theta, mrope_section)
        self.layers = nn.ModuleList(
            [
                Ideogram4TransformerBlock(hidden_size, num_attention_heads, intermediate_size, adaln_dim, norm_eps)
                for _ in range(num_layers)
            ]
        )
        self.final_layer = Ideogram4FinalLayer(hidden_size, in_channels, adaln_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None,
        indicator: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Velocity for every token of a packed sequence; only image positions are meaningful.

        Args:
            hidden_states (`(B, L, in_channels)`): noisy image tokens; other positions are zeroed here.
            timestep (`(B,)` or `(1,)`): model time in [0, 1], 0 = noise, 1 = data; `(1,)` is shared by the batch.
            encoder_hidden_states (`(B, T, llm_features_dim)`, T <= L, or None): text features of the first T
                positions (T = L as in diffusers' built-in model, or just the text prefix); non-text positions are
                zeroed here. None when the sequence holds no text (the unconditional branch).
            position_ids (`(B, L, 3)` int): (t, h, w) MRoPE positions.
            segment_ids (`(B, L)` int or None): tokens attend only within their segment; None means one segment.
            indicator (`(B, L)` int): 3 = text, 2 = image, anything else = padding.
            attention_mask (`(B, 1, L, L)` bool, *optional*): the segment mask, built once per pipeline call
                (`PackedLayout.attention_mask`); when given, `segment_ids` is not read.
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales the loaded LoRA adapters.
            return_dict (`bool`): return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            `(B, L, in_channels)` velocity in the compute dtype (the dtype of `hidden_states`).
        """
        lora_scale = self.scale_from_attention_kwargs(attention_kwargs)
        if self._parallel_config is not None:
            self._check_context_parallel(hidden_states.shape[1])
        saved_scalings = self._scale_lora(lora_scale) if lora_scale != 1.0 else []
        try:
            if attention_mask is None and segment_ids is not None:
                attention_mask = segment_attention_mask(segment_ids)
            output = self._velocity(
                hidden_states, timestep, encoder_hidden_states, position_ids, attention_mask, indicator
            )
        finally:
            for layer, scaling in saved_scalings:
                layer.scaling = scaling
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _scale_lora(self, lora_scale: float) -> list:
        """Scale every LoRA layer for one call and return the scalings to restore afterwards. Restoring the saved
        values (rather than dividing back) keeps `set_adapters` weights intact even for a scale of 0."""
        if not USE_PEFT_BACKEND or not getattr(self, "_hf_peft_config_loaded", False):
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        saved = [
            (m, dict(m.scaling)) for m in self.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "scaling")
        ]
        scale_lora_layers(self, lora_scale)
        return saved

    # ----------------------------------------------------------------------------------------------------------------
    # diffusers' switches, kept honest for this model

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' `set_attention_backend` on this model's attention processors only. diffusers also makes the
        backend the process-wide default, so that another model (the other branch) and `reset_attention_backend`
        would silently keep it; here the process-wide default is left as it was."""
        previous = _AttentionBackendRegistry._active_backend
        try:
            super().set_attention_backend(backend)
        finally:
            _AttentionBackendRegistry.set_active_backend(previous)

    def fuse_qkv_projections(self) -> None:
        """One matmul for q, k and v in every block (`Ideogram4Attention.fuse_projections`); `unfuse_qkv_projections`
        restores the checkpoint layout exactly. Refused, naming the layer, when a projection is not a plain float
        nn.Linear (a LoRA would be bypassed, fp8 / quantized weights cannot be concatenated). While fused, the model
        cannot be saved and takes no LoRA: unfuse first."""
        problems = [
            f"`{name}.{projection}` {reason}"
            for name, module in self.named_modules()
            if isinstance(module, Ideogram4Attention) and not module.fused_projections
            for projection in ("to_q", "to_k", "to_v")
            if (reason := unfusable_reason(getattr(module, projection))) is not None
        ]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(
                f"`fuse_qkv_projections` cannot fuse these projections: {'; '.join(problems[:3])}{more}. Fuse only "
                "plain float weights: merge LoRA adapters first (`fuse_lora`, then `unload_lora_weights`), fuse before "
                "enabling offload or layerwise casting, and leave fp8 or quantized checkpoints unfused. Nothing was "
                "fused."
            )
        for module in self.modules():
            if isinstance(module, Ideogram4Attention):
                module.fuse_projections()

    def _refuse_while_fused(self, action: str) -> None:
        if any(isinstance(m, Ideogram4Attention) and m.fused_projections for m in self.modules()):
            raise ValueError(
                f"Cannot {action} while q/k/v are fused (`fuse_qkv_projections`): the fused layer is not part of the "
                "checkpoint layout. Call `unfuse_qkv_projections()` first."
            )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' `save_pretrained`; refused while q/k/v are fused."""
        self._refuse_while_fused("save the model")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        """diffusers' `load_lora_adapter`; refused while q/k/v are fused (an adapter on to_q would be bypassed)."""
        self._refuse_while_fused("load a LoRA adapter")
        return super().load_lora_adapter(pretrained_model_name_or_path_or_dict, *args, **kwargs)

    def enable_cache(self, config) -> None:
        """diffusers' `enable_cache` for the caches that apply to this single-stream model (`caches.py`): First
        Block Cache, MagCache, TaylorSeer and Pyramid Attention Broadcast. Refused by name: FasterCache, SeaCache and
        TextKVCache, and any config that would hook no module."""
        from .caches import apply_cache

        apply_cache(self, config, super().enable_cache)

    @property
    def context_parallel_size(self) -> int:
        """How many processes `enable_parallelism` splits the sequence over (1 without context parallelism): the
        pipeline pads the sequence to a multiple of it."""
        config = getattr(self._parallel_config, "context_parallel_config", None)
        return 1 if config is None else config.ring_degree * config.ulysses_degree

    def check_attention_mask_support(self) -> None:
        """Raise, naming the backend, when an attention processor cannot apply the segment mask; the pipeline calls it
        before any model work for a batch that needs the mask (the processor checks again at every call)."""
        for module in self.modules():
            if isinstance(module, Ideogram4Attention):
                processor = module.processor
                backend = getattr(processor, "_attention_backend", None)
                check_mask_support(backend, getattr(processor, "_parallel_config", None))

    def _check_context_parallel(self, length: int) -> None:
        """Ulysses splits the sequence and the heads evenly over the processes; say so instead of diffusers'
        assertion deep in the sharding hook."""
        config = self._parallel_config.context_parallel_config
        if config is None:
            return
        processes = config.ring_degree * config.ulysses_degree
        if length % processes and not (config.ulysses_anything or config.ring_anything):
            raise ValueError(
                f"Context parallelism over {processes} processes needs a sequence length divisible by {processes}, "
                f"got {length} tokens (text + image). The pipeline pads the text to fit; calling the model directly, "
                "pad the sequence (`layout.pack_layout(..., multiple=...)`)."
            )
        heads = self.config.num_attention_heads
        if heads % config.ulysses_degree and not config.ulysses_anything:
            raise ValueError(
                f"Ulysses attention over {config.ulysses_degree} processes needs a head count divisible by "
                f"{config.ulysses_degree}; this model has {heads} heads. Use a `ulysses_degree` that divides {heads}."
            )

    @staticmethod
    def scale_from_attention_kwargs(attention_kwargs: dict | None) -> float:
        """The LoRA scale in `attention_kwargs` (default 1.0); any other key is an error."""
        attention_kwargs = attention_kwargs or {}
        unknown = sorted(set(attention_kwargs) - set(SUPPORTED_ATTENTION_KWARGS))
        if unknown:
            raise ValueError(
                f"`attention_kwargs` has unsupported keys {unknown}; Ideogram 4 accepts only {list(SUPPORTED_ATTENTION_KWARGS)} "
                f"(the LoRA scale)."
            )
        return finite_float("attention_kwargs['scale']", attention_kwargs.get("scale", 1.0))

    def _velocity(self, hidden_states, timestep, encoder_hidden_states, position_ids, attention_mask, indicator):
        dtype = hidden_states.dtype
        is_image = (indicator == IMAGE_INDICATOR).unsqueeze(-1)  # (B, L, 1)
        is_text = (indicator == TEXT_INDICATOR).unsqueeze(-1)
        zero = hidden_states.new_zeros(())

        # 1-3. Image tokens, text features and the role embedding share one residual stream.
        hidden_states = torch.where(is_image, self.input_proj(torch.where(is_image, hidden_states, zero)), zero)
        if encoder_hidden_states is not None:
            # Text features may cover only a prefix of the sequence (the text part): the projection then skips the
            # image tokens, whose text contribution is zero anyway.
            num_text = encoder_hidden_states.shape[1]
            is_text = is_text[:, :num_text]
            text = torch.where(is_text, encoder_hidden_states.to(dtype), zero)
            text = torch.where(is_text, self.llm_cond_proj(self.llm_cond_norm(text)), zero)  # (B, T, D)
            hidden_states = hidden_states + F.pad(text, (0, 0, 0, hidden_states.shape[1] - num_text))
        hidden_states = hidden_states + self.embed_image_indicator(is_image.squeeze(-1).long()).to(dtype)

        # 4. Timestep conditioning, one vector per sample: (B, 1, adaln_dim).
        adaln_input = F.silu(self.adaln_proj(self.t_embedding(timestep, dtype)))
        adaln_input = adaln_input.unsqueeze(1) if adaln_input.dim() == 2 else adaln_input

        # 5. Rotary tables in float32, cast once for all blocks: (B, L, 1, Dh).
        cos, sin = self.rotary_emb(position_ids)
        rotary = (cos.to(dtype).unsqueeze(2), sin.to(dtype).unsqueeze(2))

        # 6. Blocks.
        for block in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, adaln_input, rotary, attention_mask
                )
            else:
                hidden_states = block(hidden_states, adaln_input, rotary, attention_mask)

        # 7. Final layer.
        return self.final_layer(hidden_states, adaln_input)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a checkpoint in the diffusers or the original (fused attention) layout, or the fp8 release, strictly
        (`diffusers_ideogram4.loading`). Takes the arguments of diffusers' `ModelMixin.from_pretrained`
        (`LOADING_KWARGS`); the original layout and the fp8 release load on one device, without quantization config.
        """
        return load_pretrained(
            pretrained_model_name_or_path,
            build_model=lambda folder: cls.from_config(cls.load_config(folder)),
            host_from_pretrained=super().from_pretrained,
            hint="Expected an Ideogram 4 transformer (`transformer/` of an Ideogram 4 repo).",
            key_plan=original_key_plan,
            known_kwargs=LOADING_KWARGS,
            **kwargs,
        )

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """Load one transformer from a single file, strictly (`diffusers_ideogram4.single_file`): a GGUF file (through
        diffusers' GGUF support), or a safetensors file in the original or diffusers layout, in bf16 / fp32, the fp8
        release's format, or ComfyUI's scaled fp8 and nvfp4 formats; keys may carry `model.diffusion_model.` or
        `diffusion_model.`. The format is read from the file.

        Args:
            pretrained_model_link_or_path: a file path or a hub file URL
                (`https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>`).
            config: the architecture: a size name (`"ideogram4"`, the default, or `"tiny"`), a dict of this class's
                arguments, or a folder / hub repo with the transformer's config.json (`subfolder`, default
                `transformer/` when the root has no config.json).
            dtype (or torch_dtype): the compute dtype (default float32); quantized weights keep their stored format.
            device: where to put the model (default the CPU).
            quantization_config: GGUF files only, a `diffusers.GGUFQuantizationConfig` (its compute_dtype).
            disable_mmap, cache_dir, revision, token, local_files_only, force_download, proxies: as in
                `from_pretrained`.
        """
        from .single_file import load_single_file

        return load_single_file(cls, pretrained_model_link_or_path, **kwargs)
