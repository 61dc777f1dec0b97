"""The names table of docs/weights.md, generated from the registry (`medjax.weights.registry`).

    python scripts/weights_table.py            # print the table
    python scripts/weights_table.py --write    # replace it in docs/weights.md (between the table markers)

tests/test_weights.py checks that the page carries the current table.
"""

from __future__ import annotations

import os
import sys

from medjax.models import VARIANTS
from medjax.weights import registry

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "weights.md")
BEGIN, END = "<!-- weights table: begin -->", "<!-- weights table: end -->"


def _source(s: registry.Source) -> str:
    f = s.checkpoint
    if f.url.startswith("https://huggingface.co/"):
        repo, _, rest = f.url[len("https://huggingface.co/"):].partition("/resolve/")
        return f"HF `{repo}` `{rest.partition('/')[2]}` @ `{s.revision or rest.partition('/')[0]}`"
    extra = f" + `{s.files[1].filename}`" if len(s.files) > 1 else ""
    return f"<{f.url}>{extra}"


def table() -> str:
    rows = ["| name | family | variant | source | size | licence | digest |",
            "|---|---|---|---|---|---|---|"]
    for name, s in registry.sources().items():
        if name.startswith("test_"):
            continue
        family = VARIANTS[s.model][0] if s.model in VARIANTS else "?"
        if s.checkpoint.sha256:
            digest = "SHA-256 `" + s.checkpoint.sha256 + "…`"
        else:
            digest = "Hugging Face LFS" if s.checkpoint.url.startswith("https://huggingface.co/") else "none published"
        rows.append(f"| `{name}` | {family} | `{s.model}` | {_source(s)} | ≈{s.size / 1e6:,.0f} MB | {s.licence} | "
                    f"{digest} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--write" not in argv:
        print(table())
        return 0
    text = open(DOC).read()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(DOC, "w") as f:
        f.write(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
