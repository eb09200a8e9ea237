import json

import pytest
import torch


torch.set_num_threads(1)

# A small valid structured caption (SPEC 7) and a second one of a different token length.
CAPTION = json.dumps(
    {
        "high_level_description": "A red poster that says HELLO.",
        "style_description": {"aesthetics": "bold", "lighting": "soft", "medium": "print", "art_style": "flat"},
        "compositional_deconstruction": {
            "background": "plain red",
            "elements": [{"type": "text", "bbox": [100, 100, 400, 900], "text": "HELLO", "desc": "big letters"}],
        },
    },
    separators=(",", ":"),
    ensure_ascii=False,
)
CAPTION_SHORT = json.dumps(
    {"compositional_deconstruction": {"background": "a cat on a mat", "elements": []}},
    separators=(",", ":"),
)


@pytest.fixture(scope="session")
def tiny_pipe():
    from diffusers_ideogram4.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
