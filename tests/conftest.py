import json

import diffusers
import pytest
import torch
from packaging.version import Version


torch.set_num_threads(1)

# diffusers' own Ideogram 4 classes (diffusers >= 0.39) are the numerical reference of the parity tests.
needs_peer = pytest.mark.skipif(
    not hasattr(diffusers, "Ideogram4Pipeline"),
    reason=f"diffusers {diffusers.__version__} has no built-in Ideogram 4 classes to compare with (>= 0.39 has)",
)
# diffusers 0.38's pipeline-level enable_group_offload needs torch.accelerator.current_accelerator() to be set.
needs_cpu_group_offload = pytest.mark.skipif(
    Version(diffusers.__version__) < Version("0.39") and not torch.cuda.is_available(),
    reason=f"diffusers {diffusers.__version__}'s enable_group_offload fails on a machine without an accelerator",
)

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


@pytest.fixture
def no_model(monkeypatch):
    """The names of the tiny tokenizers and pipelines built during the test (tests assert it stays empty)."""
    import diffusers_ideogram4.testing as testing

    built = []
    monkeypatch.setattr(testing, "tiny_pipeline", lambda **kw: built.append("pipeline"))
    monkeypatch.setattr(testing, "tiny_tokenizer", lambda *a: built.append("tokenizer"))
    return built
