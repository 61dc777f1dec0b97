#!/usr/bin/env bash
# What the launch scripts share (sourced, not run): shell quoting, the options both take, the argument checks.

# q WORD: WORD quoted for a shell, left bare when it needs no quotes (as Python's shlex.quote)
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
joinq() { local out="" w; for w in "$@"; do out+=" $(q "$w")"; done; printf '%s' "${out# }"; }

# The options both scripts take, with their defaults; take_run_option reads them (the script's usage() lists them).
CONFIG=""
GRID=""
WORKDIR=""
DATA_DIR=""
WEIGHTS_DIR=""
DRY_RUN=0
OVERRIDES=()

# take_run_option ARGS...: if ARGS starts with one of the shared options (--config, --grid, --workdir, --data-dir,
# --weights-dir, --dry-run, -h/--help, then -- and the overrides after it), sets its variable and TAKEN to the number
# of arguments it used; else TAKEN=0 (the script's own options).
# shellcheck disable=SC2034  # the variables are read by the script that sources this file
take_run_option() {
  TAKEN=2
  case "$1" in
    --config) need_value "$@"; CONFIG="$2" ;;
    --grid) need_value "$@"; GRID="$2" ;;
    --workdir) need_value "$@"; WORKDIR="$2" ;;
    --data-dir) need_value "$@"; DATA_DIR="$2" ;;
    --weights-dir) need_value "$@"; WEIGHTS_DIR="$2" ;;
    --dry-run) DRY_RUN=1; TAKEN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) TAKEN=$#; shift; OVERRIDES=("$@") ;;
    *) TAKEN=0 ;;
  esac
}

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
