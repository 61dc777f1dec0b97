"""The library owns its schema: every recipe and every grid cell validates against medjax/schema.py and declares no
field of its own; recipes resolve by name; no module of the library imports the recipes or the converter CLI; every
command line's --help is complete and exits 0."""

import ast
import os
import re
import subprocess
import sys

import pytest

from medjax import schema, studies
from medjax.testing import ROOT

DECLARED = set(schema._dotted_fields(schema.study_config()))


def _check(config, where):
    schema.validate(config)
    extra = set(schema._dotted_fields(config)) - DECLARED
    assert not extra, (where, extra)


def test_every_recipe_validates_against_the_schema():
    names = schema.recipe_names()
    assert {"demo", "dinov2_chexpert", "glioma_pneumonia", "grid"} <= set(names)
    for name in names:
        if name == "grid":
            continue
        _check(schema.load_recipe(name), name)


def test_every_grid_cell_validates_against_the_schema():
    cells = studies.cells()
    assert len(cells) >= 426
    for cell in cells:
        config = schema.load_recipe("grid:" + studies.cell_arg(cell))
        _check(config, cell)
        assert config.grid_cell.arg == studies.cell_arg(cell)
        if cell["head"] == "probe":  # the probe section is the schema's, CNNs on their pooled feature alone
            cnn = config.model.family in ("resnet", "densenet", "vgg")  # the CNNs (SPEC section 8)
            assert tuple(config.probe.blocks) == ((1,) if cnn else (1, 4))


def test_recipes_resolve_by_name_path_and_file(tmp_path):
    assert schema.recipe_path("demo") == os.path.join(ROOT, "configs", "demo.py")
    assert schema.recipe_path("grid:model=mae_b,dataset=chexpert").endswith("grid.py:model=mae_b,dataset=chexpert")
    mine = tmp_path / "my_recipe.py"
    mine.write_text("from medjax.schema import study_config\n\n\ndef get_config(arg=None):\n"
                    "    c = study_config()\n    c.dataset = arg or 'chexpert'\n    return c\n")
    assert schema.load_recipe(f"{mine}:isic2019").dataset == "isic2019"
    with pytest.raises(schema.ConfigError, match="did you mean demo"):
        schema.recipe_path("dmeo")


def test_no_library_module_imports_the_recipes_or_the_converter_cli():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "medjax")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("configs",
                                                                                                "converters")]
    assert not offenders, offenders


CLIS = ["medjax.main", "medjax.grid", "medjax.data", "medjax.protocols", "medjax.predict", "medjax.export",
        "medjax.explain", "medjax.report", "medjax.embed", "converters"]


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_help_exits_zero(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() or proc.stdout.startswith("python -m"), proc.stdout[:500]
    # no help line stops mid-sentence: every description/epilog paragraph ends with a full stop, colon or bracket
    assert "Traceback" not in proc.stderr


def test_every_rule_list_is_matched_and_refused_the_same_way():
    """trainable_rules, lr_scale_rules, sharding_rules and LoRA targets: one compiler, one error for a bad regex."""
    import jax
    import numpy as np

    from medjax import peft, rules, sharding

    params = {"backbone": {"blocks_0": {"attn": {"qkv": {"kernel": np.zeros((4, 12))}}}}, "head": {"bias": np.zeros(2)}}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    calls = {
        "model.trainable_rules": lambda r: rules.trainable_mask(params, [(r, "train"), (".*", "train")]),
        "optim.lr_scale_rules": lambda r: rules.lr_scales(params, [(r, 0.5), (".*", 1.0)]),
        "sharding_rules": lambda r: sharding.param_specs(params, mesh, [(r, "fsdp")]),
        "model.lora.targets": lambda r: peft.lora_targets(params, r),
    }
    for field, call in calls.items():
        with pytest.raises(rules.RuleError, match=rf"^{re.escape(field)}: bad regex '\(qkv'"):
            call("(qkv")
    # the same regex selects the same parameter in each list (re.search over the /-joined path)
    assert rules.trainable_mask(params, [("qkv/kernel$", "train"), (".*", "freeze")])["head"]["bias"] is False
    assert sharding.param_specs(params, mesh, [("qkv/kernel$", "fsdp"), (".*", "replicate")])
    assert peft.lora_targets(params, "qkv/kernel$") == ["backbone/blocks_0/attn/qkv/kernel"]
    with pytest.raises(rules.RuleError, match="sharding_rules: the tactic must be 'fsdp' or 'replicate', got 'shard'"):
        sharding.param_specs(params, mesh, [(".*", "shard")])
