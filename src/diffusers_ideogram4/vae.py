"""The FLUX.2 VAE (SPEC 1), loaded strictly."""

from diffusers import AutoencoderKLFlux2

from .loading import check_loading_info


class StrictAutoencoderKLFlux2(AutoencoderKLFlux2):
    """A loader for diffusers' `AutoencoderKLFlux2` that refuses a checkpoint with missing, unexpected or mis-shaped
    keys (diffusers' own `from_pretrained` only logs them and initialises the missing weights at random).

    What it returns is a plain `AutoencoderKLFlux2`, so the pipeline's VAE, and any folder saved from it, are exactly
    diffusers' own.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        hint = "Expected the FLUX.2 VAE (`vae/` of an Ideogram 4 repo)."
        check_loading_info(info, pretrained_model_name_or_path, kwargs.get("subfolder"), hint)
        model.__class__ = AutoencoderKLFlux2
        return (model, info) if wants_info else model
