"""Every family's fixture script (`medjax/models/<family>/make_fixture.py`) imports without its upstream package
(torchvision, segment_anything, ... are imported when a fixture is made, not at import) and its command line's help
exits 0 and names the fixture it regenerates. Whether a script reproduces its fixture needs the upstream code; see
docs/adding_a_family.md."""

import glob
import importlib
import os

import pytest

from medjax.testing import ROOT

SCRIPTS = sorted(os.path.basename(os.path.dirname(p))
                 for p in glob.glob(os.path.join(ROOT, "medjax", "models", "*", "make_fixture.py")))


def test_every_family_has_a_fixture_script():
    assert {"resnet", "densenet", "vgg", "sam", "dinov3", "dinov3_convnext", "siglip"} <= set(SCRIPTS)


@pytest.mark.parametrize("family", SCRIPTS)
def test_fixture_script_help(family, capsys):
    script = importlib.import_module(f"medjax.models.{family}.make_fixture")
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    assert "fixture" in capsys.readouterr().out
