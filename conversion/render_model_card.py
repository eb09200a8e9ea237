"""Render a model card template from model_cards/ for a folder made outside the conversion script (nf4, LoRA).

    python conversion/render_model_card.py nf4 --folder ideogram-4-nf4 --repo-id your-name/ideogram-4-nf4 \
        --source ideogram-ai/ideogram-4-fp8 --dtype nf4 --set peak_memory="not measured yet"

Writes FOLDER/README.md (or --output). Sizes come from the folder; every `{{ name }}` of the template needs a value.
"""

import argparse
import sys
from pathlib import Path

from diffusers_ideogram4.commands import exit_code
from diffusers_ideogram4.conversion import folder_sizes, model_card_variables, render_model_card
from diffusers_ideogram4.files import write_atomically


sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_ideogram4_to_diffusers import card_variable, model_card_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=model_card_path, help="bf16, fp8, nf4, lora, or a template path")
    parser.add_argument("--folder", required=True, type=Path, help="the folder the card describes")
    parser.add_argument("--repo-id", required=True, help="the hub repo the folder is published as")
    parser.add_argument("--source", required=True, help="where the weights came from")
    parser.add_argument("--dtype", default="not recorded", help="the weights' dtype, in words (e.g. bfloat16)")
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--set", type=card_variable, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--output", type=Path, default=None, help="default: FOLDER/README.md")
    args = parser.parse_args(argv)

    def render() -> int:
        variables = model_card_variables(
            source=args.source,
            dtype=args.dtype,
            component_sizes=folder_sizes(args.folder),
            repo_id=args.repo_id,
            base_model=args.base_model,
            **dict(args.set),
        )
        card = render_model_card(args.template.read_text(encoding="utf-8"), variables)
        output = args.output or args.folder / "README.md"
        write_atomically(output, card.encode("utf-8"))  # complete or not at all
        print(f"wrote {output}")
        return 0

    return exit_code(render)


if __name__ == "__main__":
    sys.exit(main())
