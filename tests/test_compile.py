"""torch.compile: the transformer compiles whole or block by block without graph breaks (`fullgraph=True`), does not
compile again from one step to the next, and matches eager on the image tokens."""

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import CAPTION, CAPTION_SHORT, seeded
from diffusers_ideogram4.layout import pack_layout
from diffusers_ideogram4.testing import tiny_pipeline, tiny_transformer
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
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_transformer_has_no_graph_break_and_no_recompile():
    model = tiny_transformer(seed=2)
    with torch.no_grad():
        eager = [model(**step_inputs(t))[0] for t in TIMESTEPS]
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
        with torch._dynamo.config.patch(error_on_recompile=True):  # so is a recompile
            outputs = [compiled(**step_inputs(t))[0] for t in TIMESTEPS]
    image = step_inputs(0.0)["indicator"] == 2
    for got, expected in zip(outputs, eager):
        torch.testing.assert_close(got[image], expected[image], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_repeated_blocks_compile_once_in_a_pipeline_call():
    """Both transformers' blocks, compiled by `compile_repeated_blocks(fullgraph=True)`, through a whole call: the
    graphs are made at the first step (one per sequence shape: the two branches differ) and none after it."""
    pipe = tiny_pipeline(seed=0)
    call = dict(height=256, width=256, num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    eager = pipe([CAPTION, CAPTION_SHORT], generator=seeded(0), **call).images
    for transformer in (pipe.transformer, pipe.unconditional_transformer):
        transformer.compile_repeated_blocks(fullgraph=True)
    graphs = []
    record = lambda pipe, step, tau, tensors: graphs.append(counters["stats"]["unique_graphs"])  # noqa: E731
    compiled = pipe([CAPTION, CAPTION_SHORT], generator=seeded(0), callback_on_step_end=record, **call).images
    assert graphs[0] > 0 and graphs == [graphs[0]] * 4, graphs
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
