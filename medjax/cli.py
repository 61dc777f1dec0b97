"""The command lines that take a recipe (`python -m medjax.main`, `python -m medjax.plan`): absl flags with
`--config=RECIPE` (a recipe by name from any directory, or a file) and `--config.FIELD=VALUE` overrides, every problem
as one `error:` line (exit 2), `--help` complete (exit 0)."""

from __future__ import annotations

import re
import sys

from absl import flags

from medjax import schema

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
RECIPE_HELP = ("a recipe: a name (demo, dinov2_chexpert, grid:CELL, ...) or a file (configs/demo.py, "
               "/path/to/my_recipe.py[:ARG])")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def usage(doc: str, names: list[str]) -> str:
    """The module docstring and every named flag with its help."""
    fl = flags.FLAGS
    lines = [doc.strip(), "", "Flags:", f"  --config=RECIPE  {RECIPE_HELP}",
             f"                   recipes: {', '.join(schema.recipe_names())}",
             "  --config.FIELD=VALUE  override a field of the recipe (every field: medjax/schema.py)"]
    lines += [f"  --{n}  {fl[n].help}" for n in names if n != "config"]
    return "\n".join(lines + ["  --verbosity=N  absl log level (default: warnings only)", ""])


def resolve_recipe(argv: list[str]) -> list[str]:
    """`--config=NAME[:ARG]` -> the recipe file's path, as config_flags loads it; a file path stays as given."""
    out = []
    for i, a in enumerate(argv):
        if i and a.startswith("--config="):
            try:
                a = "--config=" + schema.recipe_path(a[len("--config="):])
            except schema.ConfigError as e:
                fail(str(e))
        out.append(a)
    return out


def flag_error(argv: list[str], e: Exception) -> str:
    """An unknown `--config.x=y` names the closest declared field; other flag errors pass through on one line."""
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)(=|$)", a))]
    if config_file and overrides:
        try:
            config = schema.load_recipe(config_file)
        except Exception as load_error:  # noqa: BLE001 - the user's recipe file may raise anything
            return f"--config={config_file}: cannot load it: {type(load_error).__name__}: {load_error}".splitlines()[0]
        for dotted in overrides:
            node = config
            for part in dotted.split("."):
                if not hasattr(node, "keys") or part not in node.keys():
                    return schema.unknown_field_message(config, dotted)
                node = node[part]
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, flags.Error) else text


def parse_recipe_flags(argv: list[str], doc: str, names: list[str], required: list[str], example: str) -> list[str]:
    """absl's parse of a recipe command line, with --help and every problem handled as the module docstring says."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(usage(doc, names))
        sys.exit(0)
    argv = resolve_recipe(argv)
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - a bad flag, a config file that fails to load, a bad override
        fail(flag_error(argv, e))
    for name in required:
        if not flags.FLAGS[name].value:
            fail(f"--{name} is required ({example})")
    return rest
