"""diffusers' AutoPipelines find this package's pipelines for Ideogram 4 once `diffusers_ideogram4` is imported.

AutoPipeline looks a pipeline up by its class name in tables keyed by model name. diffusers >= 0.39 lists its own
built-in `Ideogram4Pipeline` under "ideogram4" for text-to-image (and nothing for image-to-image or inpainting); ours
has the same class name, so only replacing that entry can work. While this package is imported, "ideogram4" maps to
`Ideogram4Pipeline`, `Ideogram4Img2ImgPipeline` and `Ideogram4InpaintPipeline` of this package in the three tables:
`AutoPipelineForText2Image.from_pretrained(repo)` and `.from_pipe(pipe)` give ours, and diffusers' built-in Ideogram 4
pipeline is no longer reachable through AutoPipeline (its class still works when used directly). Other models are
untouched.

diffusers' AutoPipeline module imports every pipeline diffusers ships (seconds), so it is not imported here: the
tables are updated right away when it already is, else the moment it gets imported.
"""

import importlib
import importlib.abc
import importlib.util
import sys


AUTO_PIPELINE_MODULE = "diffusers.pipelines.auto_pipeline"
MODEL_NAME = "ideogram4"
# diffusers' table -> (module of this package, pipeline class) that "ideogram4" maps to there.
AUTO_PIPELINE_TABLES = {
    "AUTO_TEXT2IMAGE_PIPELINES_MAPPING": (".pipeline_ideogram4", "Ideogram4Pipeline"),
    "AUTO_IMAGE2IMAGE_PIPELINES_MAPPING": (".pipeline_ideogram4_edit", "Ideogram4Img2ImgPipeline"),
    "AUTO_INPAINT_PIPELINES_MAPPING": (".pipeline_ideogram4_edit", "Ideogram4InpaintPipeline"),
}


def register_auto_pipelines(auto_pipeline=None) -> None:
    """Map "ideogram4" to this package's pipelines in diffusers' AutoPipeline tables (in place: the entry keeps its
    position, so lookups by class name find it first)."""
    auto_pipeline = auto_pipeline or importlib.import_module(AUTO_PIPELINE_MODULE)
    for table, (module, name) in AUTO_PIPELINE_TABLES.items():
        getattr(auto_pipeline, table)[MODEL_NAME] = getattr(importlib.import_module(module, __package__), name)


class _RegisteringLoader:
    """diffusers' own loader of the AutoPipeline module, registering this package's pipelines once it has run."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register_auto_pipelines(module)

    def __getattr__(self, name):  # create_module, get_source, get_filename, ... as the wrapped loader has them
        return getattr(self.loader, name)


class _AutoPipelineWatcher(importlib.abc.MetaPathFinder):
    """Finds diffusers' AutoPipeline module with the other finders, once, and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != AUTO_PIPELINE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install_auto_pipelines() -> None:
    """Register now if diffusers' AutoPipeline module is loaded, else when it is (called on `import
    diffusers_ideogram4`)."""
    if AUTO_PIPELINE_MODULE in sys.modules:
        register_auto_pipelines(sys.modules[AUTO_PIPELINE_MODULE])
    elif not any(isinstance(finder, _AutoPipelineWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoPipelineWatcher())
