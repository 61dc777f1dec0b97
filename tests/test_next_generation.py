"""The next-generation grid rows (medjax/studies.py NEXT_GENERATION, `study=nextgen`): DINOv3-B/L, DINOv3-ConvNeXt-B,
SigLIP 2-B and MedSigLIP on the reference study's datasets, heads and freeze settings with its recipe; each cell's
config validates and names the converter variant its folder comes from; the report shows them beside DINOv2."""

import json
import os

import pytest

from medjax import grid as grid_cli
from medjax import models, report, schema
from medjax.testing import ROOT

grid = grid_cli.load_grid(os.path.join(ROOT, "configs", "grid.py"))

NEXT = {  # model key -> (row name, converter variant, family)
    "dinov3_b": ("DINOv3-B", "dinov3_vitb16", "dinov3"),
    "dinov3_l": ("DINOv3-L", "dinov3_vitl16", "dinov3"),
    "dinov3_convnext_b": ("DINOv3-ConvNeXt-B", "dinov3_convnext_base", "dinov3_convnext"),
    "siglip2_b": ("SigLIP 2-B", "siglip2_base_patch16_224", "siglip"),
    "medsiglip": ("MedSigLIP", "medsiglip_448", "siglip"),
}


def _cells():
    return [c for c in grid.cells() if c["study"] == "nextgen"]


def test_the_next_generation_table_is_the_reference_grid_for_new_models():
    cells = _cells()
    main = [c for c in grid.cells() if c["study"] == "mansoori"]
    assert {c["model"] for c in cells} == set(NEXT) and len(cells) == 5 * 4 * 2 * 2
    settings = [{(c["dataset"], c["head"], c["freeze"]) for c in cs} for cs in (cells, main)]
    assert settings[0] == settings[1]  # the same datasets, heads and freeze settings
    assert not set(NEXT) & set(grid.BACKBONES) and "nextgen" in grid.FILTER_AXES["study"]


@pytest.mark.parametrize("key", sorted(NEXT))
def test_cells_validate_with_the_reference_recipe(key):
    name, variant, family = NEXT[key]
    for cell in [c for c in _cells() if c["model"] == key]:
        c = grid.get_config(grid.cell_arg(cell))
        schema.validate(c)
        reference = grid.get_config(grid.cell_arg({**cell, "model": "dinov2_b", "study": "mansoori"}))
        for field in ("dataset", "data_root", "image_size", "batch_size", "epochs", "compute_dtype", "optim",
                      "model.head", "model.freeze", "model.attention_head", "model.grayscale", "normalization"):
            got, want = c, reference
            for part in field.split("."):
                got, want = got[part], want[part]
            assert got == want, (cell, field)
        assert c.model.family == family and c.model.pretrained == f"{c.weights_dir}/{variant}"
        assert (c.grid_cell.backbone, c.grid_cell.study, c.grid_cell.in_study) == (name, "nextgen", False)
        assert c.grid_cell.convert.endswith(f"--model {variant}")
        json.loads(c.to_json_best_effort())


@pytest.mark.parametrize("key", sorted(NEXT))
def test_folders_are_the_converters_variants(key):
    """A model's folder is what `python -m converters --model VARIANT` writes, its parameter count medjax's count of
    the converted backbone. The DINOv3 families come from another branch: checked once they are registered."""
    m = grid.model_info(key)
    if m.family not in models.FAMILIES:
        pytest.skip(f"the {m.family} family is not registered in this checkout")
    family, kwargs = models.VARIANTS[m.variant]
    config = models.FAMILIES[family].converter.parse_config(kwargs)
    assert family == config.family == m.family
    assert round(models.count_params(models.param_shapes(config)) / 1e6, 2) == m.params_m, key


def _run(model, dataset, test, study="nextgen", params_m=None, setting=("linear", "frozen")):
    return report.Run(path=f"/runs/{model}/{dataset}", model=model, dataset=dataset,
                      target_metric=report.COLUMNS[[c[0] for c in report.COLUMNS].index(dataset)][2],
                      head=setting[0], freeze=setting[1], params_m=params_m, val=test, test=test, study=study)


def test_the_report_places_them_beside_dinov2():
    runs = [_run("DINOv2-B", "ddsm", 0.95, study="mansoori", params_m=86.58),
            _run("MedSigLIP", "ddsm", 0.97, params_m=428.57), _run("SigLIP 2-B", "ddsm", 0.96, params_m=92.88),
            _run("DINOv3-B", "chexpert", 0.81, params_m=85.66),
            _run("my_model", "ddsm", 0.5, study="", params_m=1.0)]
    order = report.model_order(runs)
    study = list(report.STUDY)
    after = max(i for i, m in enumerate(study) if m.startswith("DINOv2")) + 1
    assert order == study[:after] + ["DINOv3-B", "SigLIP 2-B", "MedSigLIP"] + study[after:] + ["my_model"]
    md = report.markdown(runs)
    assert "| MedSigLIP ‡ (428.6 / —) | 0.970 [linear / frozen] |" in md and "‡ : a next-generation" in md
    assert "| DINOv2-B (86.6 / 86) |" in md and "my_model ‡" not in md
