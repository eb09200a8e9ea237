"""Editing with Ideogram 4: `Ideogram4Img2ImgPipeline` and `Ideogram4InpaintPipeline` (outpainting is inpainting on
a larger canvas, `canvas.expand_canvas`). Both are `Ideogram4Pipeline`s: the same components, loading, LoRA, offload,
fp8 and caption check, and every text-to-image argument; `from_pipe(pipe)` shares a loaded pipeline's components.

How an edit samples (SPEC 4 and 5, with diffusers' `strength` convention):
- The image is encoded by the VAE encoder, taking the latent distribution's mode (deterministic), patchified to token
  layout and normalised, the exact inverse of decoding: x0 = (patchify(mode) - shift) / scale.
- Of the N steps of the schedule (taus rising from TAU_MIN, noise, to TAU_MAX), `strength` s runs the last
  m = round(s * N) (rounded half up), with their guidance values, from z = tau * x0 + (1 - tau) * noise at the model
  time tau where they start. When m = N (strength 1.0) the start is the noise itself, as in text-to-image. The
  generator draws only that noise, exactly as text-to-image draws it: a seed means the same noise in both.
- Inpainting: after every step the kept tokens are put back as the original noised to the model time the step
  reached, z = tau * x0 + (1 - tau) * noise, and after the last step as x0 itself, so that the kept region decodes to
  the original up to the VAE round trip (diffusers' inpaint pipelines do the same).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .canvas import MASK_THRESHOLD, REPAINT, token_weights
from .constants import PIXELS_PER_TOKEN
from .layout import latent_statistics, patchify
from .pipeline_ideogram4 import Ideogram4Pipeline, Ideogram4PipelineOutput, arguments_for
from .validation import check_image_size, finite_float


# diffusers' `VaeImageProcessor` resize modes; `resize_mode=None` (the default) never resizes.
RESIZE_MODES = ("default", "fill", "crop")
DEFAULT_IMG2IMG_STRENGTH = 0.6
DEFAULT_INPAINT_STRENGTH = 1.0
RGB_CHANNELS = 3


class EditInputs(NamedTuple):
    """What `check_edit_inputs` found: the strength, the number of images, the size to edit at, and the pixel masks
    (n, H, W) float32 in [0, 1] at the image's size (None without a mask)."""

    strength: float
    num_images: int
    height: int
    width: int
    masks: np.ndarray | None


# --------------------------------------------------------------------------------------------------------------------
# Checks that need no model (the command line runs them before loading one)


def check_strength(strength) -> float:
    strength = finite_float("strength", strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            f"`strength={strength}` is outside (0, 1]: 1.0 repaints from pure noise over the whole schedule, smaller "
            "values keep more of the image (0.6 runs the last 60 % of the steps). Pass a value in (0, 1]."
        )
    return strength


def steps_for_strength(strength: float, num_inference_steps: int) -> int:
    """m = round(strength * N), rounded half up: how many of the schedule's last steps an edit runs."""
    steps = math.floor(strength * num_inference_steps + 0.5)
    if steps == 0:
        raise ValueError(
            f"`strength={strength}` with `num_inference_steps={num_inference_steps}` runs round({strength} x "
            f"{num_inference_steps}) = 0 steps, which would change nothing; raise `strength` to at least "
            f"{1 / num_inference_steps:g} (one step) or use more steps."
        )
    return steps


def _single_images(image, name: str) -> list:
    """`image` as a list of entries (a PIL image, or a numpy array / tensor holding one image or a batch)."""
    entries = list(image) if isinstance(image, (list, tuple)) else [image]
    if not entries:
        raise ValueError(f"`{name}` is an empty list; pass an image, or a list with one image per prompt.")
    kinds = {type(entry) for entry in entries}
    for entry in entries:
        if not isinstance(entry, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise ValueError(
                f"`{name}` must be a PIL image, a numpy array (H, W, 3) in [0, 1], a tensor (3, H, W) in [0, 1], or a "
                f"list of them; got {type(entry).__name__}."
            )
    if len({PIL.Image.Image if issubclass(kind, PIL.Image.Image) else kind for kind in kinds}) > 1:
        raise ValueError(f"`{name}` mixes {sorted(k.__name__ for k in kinds)}; pass images of one kind.")
    return entries


def _check_range(name: str, values, low: float, high: float, hint: str) -> None:
    smallest, largest = float(values.min()), float(values.max())
    if not (low <= smallest and largest <= high):  # also refuses NaN
        raise ValueError(
            f"`{name}` holds values from {smallest:g} to {largest:g}, outside [{low:g}, {high:g}]; {hint}"
        )


def describe_images(image, name: str = "image") -> tuple[int, tuple[int, int]]:
    """-> (number of images, (width, height)). Numpy arrays are (H, W, 3) or (B, H, W, 3) and tensors (3, H, W) or
    (B, 3, H, W), with values in [0, 1] (diffusers' convention); all images one size."""
    count, sizes = 0, set()
    for index, entry in enumerate(_single_images(image, name)):
        where = name if not isinstance(image, (list, tuple)) else f"{name}[{index}]"
        if isinstance(entry, PIL.Image.Image):
            count, size = count + 1, entry.size
        else:
            layout = "(H, W, 3) or (B, H, W, 3)" if isinstance(entry, np.ndarray) else "(3, H, W) or (B, 3, H, W)"
            channels_axis = -1 if isinstance(entry, np.ndarray) else -3
            if entry.ndim not in (3, 4) or entry.shape[channels_axis] != RGB_CHANNELS:
                raise ValueError(f"`{where}` has shape {tuple(entry.shape)}; an RGB image is {layout}.")
            _check_range(where, entry, 0.0, 1.0, "images hold values in [0, 1] (divide 8-bit pixels by 255).")
            batch = entry.shape[0] if entry.ndim == 4 else 1
            height, width = entry.shape[-3:-1] if isinstance(entry, np.ndarray) else entry.shape[-2:]
            count, size = count + batch, (int(width), int(height))
        sizes.add(size)
    if len(sizes) > 1:
        raise ValueError(f"`{name}` holds images of different sizes {sorted(sizes)}; give images of one size.")
    return count, sizes.pop()


def pixel_masks(mask_image, name: str = "mask_image") -> np.ndarray:
    """The masks as (n, H, W) float32 in [0, 1]: 1 (white) = repaint, 0 (black) = keep. PIL images are read in mode
    "L" (0..255 -> 0..1); numpy arrays are (H, W) or (n, H, W), tensors (H, W), (n, H, W) or (n, 1, H, W), with
    values in [0, 1] (bool works)."""
    arrays = []
    for index, entry in enumerate(_single_images(mask_image, name)):
        where = name if not isinstance(mask_image, (list, tuple)) else f"{name}[{index}]"
        if isinstance(entry, PIL.Image.Image):
            arrays.append(np.asarray(entry.convert("L"), dtype=np.float32)[None] / REPAINT)
            continue
        values = entry.detach().cpu().float().numpy() if isinstance(entry, torch.Tensor) else np.asarray(entry)
        if isinstance(entry, torch.Tensor) and values.ndim == 4 and values.shape[1] == 1:
            values = values[:, 0]
        if isinstance(entry, np.ndarray) and values.ndim == 3 and values.shape[-1] in (1, RGB_CHANNELS, 4):
            raise ValueError(
                f"`{where}` has shape {tuple(entry.shape)}, an (H, W, channels) picture; a mask is one channel: pass "
                "(H, W) values in [0, 1] (e.g. `array[..., 0] / 255`) or the PIL image."
            )
        if values.ndim not in (2, 3):
            layout = "(H, W), (n, H, W) or (n, 1, H, W)" if isinstance(entry, torch.Tensor) else "(H, W) or (n, H, W)"
            raise ValueError(f"`{where}` has shape {tuple(entry.shape)}; a mask is {layout}.")
        values = values.astype(np.float32)
        _check_range(
            where, values, 0.0, 1.0, "masks hold 0 (black, keep) to 1 (white, repaint): divide a 0..255 mask by 255."
        )
        arrays.append(values if values.ndim == 3 else values[None])
    sizes = {array.shape[1:] for array in arrays}
    if len(sizes) > 1:
        raise ValueError(f"`{name}` holds masks of different sizes; give masks of one size.")
    return np.concatenate(arrays)


def check_edit_inputs(
    image, mask_image=None, *, strength, height=None, width=None, resize_mode=None, mask_blur=0, padding_mask_crop=None
) -> EditInputs:
    """Every check of an edit's image, mask, size and mask options that needs no model. `height` and `width` default
    to the image's size; without `resize_mode` (or `padding_mask_crop`) the image is never resized, so its size must
    be valid."""
    if image is None:
        raise ValueError("`image` is required: the image to edit (a PIL image, numpy array or tensor).")
    strength = check_strength(strength)
    blur = finite_float("mask_blur", mask_blur)
    if blur < 0:
        raise ValueError(f"`mask_blur={blur}` must be >= 0 (pixels of feathering; 0 = a hard edge).")
    if padding_mask_crop is not None and (
        isinstance(padding_mask_crop, bool) or not isinstance(padding_mask_crop, int) or padding_mask_crop < 0
    ):
        raise ValueError(
            f"`padding_mask_crop` must be an int >= 0 (pixels around the mask), got {padding_mask_crop!r}."
        )
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ValueError(
            f"`resize_mode={resize_mode!r}` is not supported; use None (never resize, the default) or one of "
            f"diffusers' {list(RESIZE_MODES)}."
        )
    if padding_mask_crop is not None and resize_mode is not None:
        raise ValueError(
            f"`padding_mask_crop` and `resize_mode={resize_mode!r}` were both given; the crop is always resized with "
            "'fill' (diffusers' convention). Leave `resize_mode` out."
        )
    if resize_mode is not None and height is None and width is None:
        raise ValueError(
            f"`resize_mode={resize_mode!r}` resizes the image to `height` x `width`, and neither was given; pass "
            "them, or leave `resize_mode` out to edit at the image's size."
        )
    count, (image_width, image_height) = describe_images(image)
    if resize_mode in ("fill", "crop") and not all(isinstance(e, PIL.Image.Image) for e in _single_images(image, "")):
        raise ValueError(f"`resize_mode={resize_mode!r}` needs PIL images (diffusers' resize); use 'default'.")
    defaulted = height is None and width is None
    height = image_height if height is None else height
    width = image_width if width is None else width
    resizing = resize_mode is not None or padding_mask_crop is not None
    if not resizing and (height, width) != (image_height, image_width):
        raise ValueError(
            f"`image` is {image_width}x{image_height} pixels (width x height) but `height={height}`, "
            f"`width={width}`; leave `height` and `width` out to edit at the image's size, or pass "
            "`resize_mode='default'` ('fill', 'crop') to resize it (never done silently)."
        )
    try:
        check_image_size(height, width)
    except ValueError as error:
        if resizing and not defaulted:
            raise
        fix = (
            "Pass valid `height=` and `width=`: the size the crop around the mask is repainted at."
            if padding_mask_crop is not None
            else "Crop or pad the image to such a size, or pass `height=`, `width=` and `resize_mode='default'` "
            "('fill', 'crop') to resize it (never done silently)."
        )
        raise ValueError(
            f"`image` is {image_width}x{image_height} pixels (width x height), a size Ideogram 4 cannot edit at: "
            f"{error} {fix}"
        ) from None
    masks = None
    if mask_image is not None:
        masks = pixel_masks(mask_image)
        mask_height, mask_width = masks.shape[1:]
        if (mask_width, mask_height) != (image_width, image_height):
            raise ValueError(
                f"`mask_image` is {mask_width}x{mask_height} pixels but `image` is {image_width}x{image_height}; "
                "give a mask of the image's size (white = repaint, black = keep)."
            )
    if padding_mask_crop is not None:
        if not isinstance(image, PIL.Image.Image) or masks is None or len(masks) != 1:
            raise ValueError(
                "`padding_mask_crop` needs `image` as one PIL image and one mask (the crop is found in the mask and "
                "pasted back into the image, diffusers' convention); convert the image with PIL.Image.fromarray."
            )
        if not masks[0].max() >= MASK_THRESHOLD:
            raise ValueError(
                "`padding_mask_crop` needs a mask with a white (repaint) region to crop around; it is black."
            )
    return EditInputs(strength, count, height, width, masks)


# --------------------------------------------------------------------------------------------------------------------


class _Ideogram4EditPipeline(Ideogram4Pipeline):
    """What image-to-image and inpainting share: the image encoding, the start of sampling at `strength`, and the
    call itself (text-to-image's steps, with an image): inpainting's, which image-to-image makes without a mask."""

    # diffusers' mask processing convention: greyscale, not normalised, binarized at 0.5 after any resize.
    mask_processor = VaeImageProcessor(
        vae_scale_factor=PIXELS_PER_TOKEN, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )

    def encode_image(self, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, N_img, 128) float32 token latents x0: the VAE encoder's latent mode,
        patchified, normalised with the exact inverse of `decode_latents` (`latent_normalization`)."""
        # diffusers' preprocess leaves channels-last strides, which pick other convolution kernels (last-bit changes).
        image = image.to(device=device, dtype=self.vae.dtype, memory_format=torch.contiguous_format)
        latents = self.vae.encode(image).latent_dist.mode()
        tokens = patchify(latents.float())
        scale, shift, _ = latent_statistics(self.vae, self.config.latent_normalization)
        return (tokens - shift.to(tokens.device)) / scale.to(tokens.device)

    @staticmethod
    def noised(x0: torch.Tensor, noise: torch.Tensor, tau: float) -> torch.Tensor:
        """The flow at model time tau (0 = noise, 1 = data): tau * x0 + (1 - tau) * noise."""
        return tau * x0 + (1 - tau) * noise

    @staticmethod
    def blend(latents: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per token: `latents` where the weight is 1 (repaint), `kept` where it is 0, exactly, and the weighted mix in
        between (a feathered edge)."""
        return latents * weights + kept * (1 - weights)

    def prepare_image(self, image, height: int, width: int, resize_mode: str | None, crop) -> torch.Tensor:
        """The images as (n, 3, H, W) in [-1, 1] (diffusers' `VaeImageProcessor`): cropped to `crop` and resized with
        'fill' (padding_mask_crop), resized with `resize_mode`, or as they are."""
        images = [e.convert("RGB") if isinstance(e, PIL.Image.Image) else e for e in _single_images(image, "image")]
        mode = "fill" if crop is not None else resize_mode or "default"  # "default" to the same size changes nothing
        return self.image_processor.preprocess(images, height, width, resize_mode=mode, crops_coords=crop)

    def prepare_mask(self, masks: np.ndarray, height, width, resize_mode, crop, mask_blur: float) -> torch.Tensor:
        """(n, H0, W0) pixel masks -> (n, N_img, 1) float32 token weights (`canvas.token_weights`), after the same
        crop / resize as the image (diffusers' mask processor: binarized again after resizing)."""
        binary = masks >= MASK_THRESHOLD
        if crop is not None or resize_mode is not None:
            pictures = [PIL.Image.fromarray(np.where(b, REPAINT, 0).astype(np.uint8), mode="L") for b in binary]
            mode = "fill" if crop is not None else resize_mode
            binary = self.mask_processor.preprocess(pictures, height, width, resize_mode=mode, crops_coords=crop)
            binary = binary[:, 0].numpy()
        weights = np.stack([token_weights(pixels.astype(np.float32), mask_blur) for pixels in binary])
        return torch.from_numpy(weights).reshape(len(weights), -1, 1)

    @staticmethod
    def _check_counts(prompts: list[str], edit: EditInputs) -> None:
        """The check that needs the prompts: one image (and mask) for all prompts, or one per prompt (the prompts
        before any expansion: an idea becomes one caption)."""
        counts = {"image": edit.num_images, "mask_image": None if edit.masks is None else len(edit.masks)}
        for name, count in counts.items():
            if count is not None and count not in (1, len(prompts)):
                raise ValueError(
                    f"`{name}` holds {count} images for {len(prompts)} prompt(s); give one for all prompts or one "
                    "per prompt."
                )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: Any,
        mask_image: Any,
        strength: float = DEFAULT_INPAINT_STRENGTH,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str | None = None,
        mask_blur: float = 0,
        padding_mask_crop: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: list[float] | None = None,
        mu: float | None = None,
        std: float | None = None,
        preset: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Ideogram4Pipeline, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        caption_check: str = "error",
        prompt_upsampling: bool = False,
        prompt_upsampling_kwargs: dict | None = None,
    ) -> Ideogram4PipelineOutput | tuple:
        r"""
        Repaint the masked part of images, guided by structured JSON captions.

        Args:
            prompt (`str` or `list[str]`): Ideogram 4 JSON caption(s), checked as in text-to-image.
            image: as in `Ideogram4Img2ImgPipeline`.
            mask_image: white (1.0 / 255) = repaint, black (0) = keep: a PIL image (read as greyscale), a numpy array
                (H, W) / (n, H, W) or a tensor (H, W) / (n, H, W) / (n, 1, H, W) with values in [0, 1], the image's
                size; one mask for every prompt, or one per prompt. A pixel is repainted when its value is >= 0.5,
                and a 16 x 16 token when any of its pixels is (`canvas.token_weights`).
            strength (`float`, defaults to 1.0): in (0, 1], as in image-to-image, for the repainted region.
            height, width, resize_mode: as in image-to-image; the mask is resized with the image.
            mask_blur (`float`, defaults to 0): feathering in pixels: the mask is blurred (Gaussian of this radius)
                and tokens near its edge are blended between repainted and original.
            padding_mask_crop (`int`, *optional*): repaint only a crop around the mask, grown by this many pixels
                and widened to the aspect of `height` x `width` (default: the image's size), at `height` x `width`,
                then paste it back into `image` where the mask is white (diffusers' inpaint convention). Needs one
                PIL `image` and one mask; the output has the image's size (`output_type="latent"` returns the crop's
                latents).
            num_inference_steps, guidance_scale, guidance_schedule, mu, std, preset, num_images_per_prompt, generator,
                latents, output_type, return_dict, attention_kwargs, callback_on_step_end,
                callback_on_step_end_tensor_inputs, caption_check, prompt_upsampling, prompt_upsampling_kwargs: as in
                image-to-image (`strength` picks how much of the schedule runs, `generator` draws only the noise,
                callback steps count from 0 at the first step that runs).
        """
        # 1. Check inputs: the image, mask and strength, then all text-to-image checks, as in text-to-image (no model
        # work before step 3 but the expansion of ideas, after every check that needs no caption).
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if mask_image is None and isinstance(self, Ideogram4InpaintPipeline):
            raise ValueError(
                "`mask_image` is None: inpainting needs a mask (white = repaint, black = keep). To change the whole "
                "image, use `Ideogram4Img2ImgPipeline.from_pipe(pipe)`, or pass an all-white mask."
            )
        edit = check_edit_inputs(**arguments_for(check_edit_inputs, locals()))
        height, width = edit.height, edit.width
        prompts, grid, guidance, mu, std = self.check_inputs(**arguments_for(self.check_inputs, locals()))
        self._check_counts(prompts, edit)
        skipped = len(guidance) - steps_for_strength(edit.strength, len(guidance))  # the first steps, left out
        self.check_denoise(guidance[skipped:], grid)
        token_ids, captions = self.prepare_call(**arguments_for(self.prepare_call, locals()))

        # 2. Image and mask at the size edited: cropped around the mask and resized only when asked.
        crop = None
        if padding_mask_crop is not None:
            binary = PIL.Image.fromarray(np.where(edit.masks[0] >= MASK_THRESHOLD, REPAINT, 0).astype(np.uint8))
            crop = self.mask_processor.get_crop_region(binary, width, height, pad=padding_mask_crop)
        pixels = self.prepare_image(image, height, width, resize_mode, crop)
        weights = (
            None if edit.masks is None else self.prepare_mask(edit.masks, height, width, resize_mode, crop, mask_blur)
        )
        device = self._execution_device

        # 3. Encode text and image; one image (and mask) serves every prompt, or one per prompt.
        text_features, text_lengths = self.encode_prompts(token_ids, num_images_per_prompt, device)
        batch_size = len(text_lengths)

        def per_image(tensor: torch.Tensor) -> torch.Tensor:
            if len(tensor) == 1:
                return tensor.expand(batch_size, *tensor.shape[1:])
            return tensor.repeat_interleave(num_images_per_prompt, dim=0)

        # 4. Schedule: the last N - `skipped` of the N steps, with their guidance, from the noised image; over the
        # whole schedule from the noise itself, text-to-image's start (image-to-image then never reads the image).
        x0 = per_image(self.encode_image(pixels, device)) if skipped or weights is not None else None
        taus = self.schedule(len(guidance), mu, std, height, width)[skipped:]
        guidance = guidance[skipped:]
        noise = self.prepare_latents(batch_size, grid, generator, latents, device)
        latents = noise if skipped == 0 else self.noised(x0, noise, taus[0])
        step_hook = None
        if weights is not None:  # inpainting: the kept tokens follow the original at every model time
            weights = per_image(weights.to(device))
            latents = self.blend(latents, self.noised(x0, noise, taus[0]), weights)

            def step_hook(step: int, latents: torch.Tensor) -> torch.Tensor:
                last = step == len(guidance) - 1
                return self.blend(latents, x0 if last else self.noised(x0, noise, taus[step + 1]), weights)

        # 5. Denoising loop.
        layouts = self.prepare_layouts(text_lengths, grid, device)
        latents = self.denoise(**arguments_for(self.denoise, locals()))

        # 6. Decode; with padding_mask_crop, paste the repainted crop into the original image.
        if output_type == "latent":
            images = latents
        elif crop is None:
            images = self.decode_latents(latents, grid, output_type)
        else:
            images = self._paste(latents, grid, image, edit.masks[0], crop, mask_blur, output_type)
        return self.finish_call(images, captions, return_dict)

    def _paste(self, latents, grid, image: PIL.Image.Image, mask: np.ndarray, crop, mask_blur, output_type):
        """Decode the repainted crop and paste it into the original image where the mask is white (diffusers'
        `apply_overlay`): outside the mask the result is the original, pixel for pixel."""
        overlay = PIL.Image.fromarray(np.where(mask >= MASK_THRESHOLD, REPAINT, 0).astype(np.uint8), mode="L")
        if mask_blur:
            overlay = self.mask_processor.blur(overlay, mask_blur)
        repainted = self.decode_latents(latents, grid, "pil")
        pasted = [self.image_processor.apply_overlay(overlay, image, crop_image, crop) for crop_image in repainted]
        if output_type == "pil":
            return pasted
        array = self.image_processor.pil_to_numpy(pasted)
        return array if output_type == "np" else self.image_processor.numpy_to_pt(array)


class Ideogram4Img2ImgPipeline(_Ideogram4EditPipeline):
    r"""
    Image-to-image with Ideogram 4: keep an image's composition and change what the caption changes. The components
    are `Ideogram4Pipeline`'s; build it with `from_pretrained` or share a loaded pipeline's with `from_pipe(pipe)`.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: Any,
        strength: float = DEFAULT_IMG2IMG_STRENGTH,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: list[float] | None = None,
        mu: float | None = None,
        std: float | None = None,
        preset: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Ideogram4Pipeline, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        caption_check: str = "error",
        prompt_upsampling: bool = False,
        prompt_upsampling_kwargs: dict | None = None,
    ) -> Ideogram4PipelineOutput | tuple:
        r"""
        Edit images guided by structured JSON captions.

        Args:
            prompt (`str` or `list[str]`): Ideogram 4 JSON caption(s), checked as in text-to-image.
            image: a PIL image, a numpy array (H, W, 3) / (B, H, W, 3) or a tensor (3, H, W) / (B, 3, H, W) with
                values in [0, 1], or a list of them: one image for every prompt, or one per prompt.
            strength (`float`, defaults to 0.6): in (0, 1]; runs the last round(strength x N) steps of the N-step
                schedule (half up), starting from the image noised to that step's model time; 1.0 starts from pure
                noise and ignores the image.
            height, width (`int`, *optional*): the size to edit at; default to the image's, which must then be a
                multiple of 16 in 256..2048. Another size needs `resize_mode`.
            resize_mode (`str`, *optional*): None never resizes; "default", "fill" or "crop" resize the image to
                `height` x `width` with diffusers' `VaeImageProcessor`.
            num_inference_steps, guidance_scale, guidance_schedule, mu, std, preset: the whole schedule, as in
                text-to-image; `strength` picks how much of it runs.
            num_images_per_prompt, generator, output_type, return_dict, attention_kwargs, caption_check,
                prompt_upsampling, prompt_upsampling_kwargs: as in text-to-image. `generator` draws only the noise,
                exactly as text-to-image draws it.
            latents (`torch.Tensor`, *optional*): the noise (B, N_img, 128) float32 in token layout, as in
                text-to-image (then leave `generator` out).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in text-to-image; steps count from 0 at the
                first step that runs.
        """
        return super().__call__(mask_image=None, **arguments_for(super().__call__, locals()))


class Ideogram4InpaintPipeline(_Ideogram4EditPipeline):
    r"""
    Inpainting (and, on a canvas from `expand_canvas`, outpainting) with Ideogram 4: repaint the white part of a mask,
    keep the black part. The components are `Ideogram4Pipeline`'s; build it with `from_pretrained` or share a loaded
    pipeline's with `from_pipe(pipe)`.
    """
