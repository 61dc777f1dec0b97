#!/usr/bin/env bash
# Argument checks shared by the launch scripts (sourced, not run).

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }

# check_run_args REPO CONFIG GRID OVERRIDES...: --config or --grid (grid cells use configs/grid.py), an existing
# config file, and only --config.x=y overrides after --. Prints the config to use.
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
  [[ -f "$repo/${config%%:*}" ]] || { echo "error: config file ${config%%:*} not found in $repo" >&2; exit 2; }
  local o
  for o in "$@"; do
    [[ "$o" == --config.* ]] || { echo "error: arguments after -- must be --config.x=y overrides, got $o" >&2; exit 2; }
  done
  echo "$config"
}
