#!/usr/bin/env bash
# Argument checks shared by the launch scripts (sourced, not run).

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }

# check_run_args REPO CONFIG GRID OVERRIDES...: --config or --grid (grid cells use configs/grid.py), an existing
# recipe (a file relative to the checkout, or a recipe name: demo -> configs/demo.py), and only --config.x=y
# overrides after --. Prints the config to use, as a path relative to the checkout.
check_run_args() {
  local repo="$1" config="$2" grid="$3"
  shift 3
  if [[ -n "$grid" ]]; then
    [[ -z "$config" ]] || { echo "error: give --config or --grid, not both" >&2; exit 2; }
    config="configs/grid.py"
  fi
  if [[ -z "$config" ]]; then
    echo "error: --config (or --grid) is required, e.g. --config configs/demo.py (see --help)" >&2
    exit 2
  fi
  local file="${config%%:*}" arg=""
  [[ "$config" == *:* ]] && arg=":${config#*:}"
  if [[ ! -f "$repo/$file" && "$file" != */* && -f "$repo/configs/$file.py" ]]; then
    config="configs/$file.py$arg"  # a recipe by name
    file="configs/$file.py"
  fi
  [[ -f "$repo/$file" ]] || { echo "error: config file or recipe $file not found in $repo" >&2; exit 2; }
  local o
  for o in "$@"; do
    [[ "$o" == --config.* ]] || { echo "error: arguments after -- must be --config.x=y overrides, got $o" >&2; exit 2; }
  done
  echo "$config"
}
