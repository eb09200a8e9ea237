"""torch.compile: the whole transformer and its repeated blocks compile without graph breaks (`fullgraph=True`), do not
recompile from one step to the next, and match eager on the image tokens."""

import pytest
import torch

from diffusers_ideogram4.layout import pack_layout
from diffusers_ideogram4.testing import tiny_transformer
from test_transformer import CONFIG


TIMESTEPS = (0.1, 0.55, 0.9)  # three steps of one call: same shapes, other times


def step_inputs(timestep: float) -> dict:
    """The pipeline's conditional call: a padded batch (the mask built once per call), one shared time."""
    layout = pack_layout([5, 3], 4, 6)
    generator = torch.Generator().manual_seed(0)
    batch, length = layout.indicator.shape
    return dict(
        hidden_states=torch.randn(batch, length, CONFIG["in_channels"], generator=generator),
        timestep=torch.tensor([timestep]),
        encoder_hidden_states=torch.randn(batch, 5, CONFIG["llm_features_dim"], generator=generator),
        position_ids=layout.position_ids,
        segment_ids=None,
        indicator=layout.indicator,
        attention_mask=layout.attention_mask,
        return_dict=False,
    )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["whole", "repeated-blocks"])
def test_compiled_transformer_has_no_graph_break_and_no_recompile(mode):
    model = tiny_transformer(seed=2)
    with torch.no_grad():
        eager = [model(**step_inputs(t))[0] for t in TIMESTEPS]
        if mode == "whole":
            compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
        else:
            model.compile_repeated_blocks(fullgraph=True)
            compiled = model
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile is an error
            outputs = [compiled(**step_inputs(t))[0] for t in TIMESTEPS]
    image = step_inputs(0.0)["indicator"] == 2
    for got, expected in zip(outputs, eager):
        torch.testing.assert_close(got[image], expected[image], rtol=1e-5, atol=1e-5)
