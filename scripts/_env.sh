# Shared by setup.sh, test.sh and demo.sh (sourced, not run): find interpreters, make venvs.
# A venv per Python version lives in the checkout: .venv (the default interpreter) and
# .venv-X.Y for the others; all are git-ignored.

MIN_MINOR=11   # Python 3.11 is the oldest supported (pyproject: requires-python >= 3.11)

# py_minor PY -> prints "3.N" if PY runs and is >= 3.11, else fails.
py_minor() {
  "$1" -c "import sys; v = sys.version_info; assert v[0] == 3 and v[1] >= $MIN_MINOR; print(f'{v[0]}.{v[1]}')" 2>/dev/null
}

# find_python [X.Y] -> prints the path of an interpreter: with X.Y, one of that version
# (pythonX.Y on PATH, then pyenv's versions, then /usr/bin, /usr/local/bin); without, the
# first python3 on PATH if it is >= 3.11, else the oldest python3.N >= 3.11 found.
find_python() {
  local want="${1:-}" c v root
  local cands=()
  if [ -z "$want" ]; then
    cands+=("$(command -v python3 || true)")
    for v in 11 12 13 14 15; do cands+=("$(command -v "python3.$v" || true)"); done
  else
    cands+=("$(command -v "python$want" || true)")
  fi
  if command -v pyenv >/dev/null 2>&1 && root=$(pyenv root 2>/dev/null); then
    for c in "$root"/versions/"${want:-3.}"*/bin/python3; do cands+=("$c"); done
  fi
  if [ -n "$want" ]; then cands+=("/usr/bin/python$want" "/usr/local/bin/python$want"); fi
  for c in "${cands[@]}"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    v=$(py_minor "$c") || continue
    if [ -z "$want" ] || [ "$v" = "$want" ]; then
      # resolve pyenv shims and the like to the real interpreter
      "$c" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  return 1
}

# available_versions -> every X.Y >= 3.11 that find_python can find, one per line.
available_versions() {
  local v
  for v in 3.11 3.12 3.13 3.14 3.15; do
    find_python "$v" >/dev/null && echo "$v"
  done
  return 0
}

# venv_dir PY -> .venv for the default interpreter's version, .venv-X.Y otherwise.
venv_dir() {
  local v d
  v=$(py_minor "$1")
  d=$(find_python 2>/dev/null) && [ "$(py_minor "$d")" = "$v" ] && { echo "$PWD/.venv"; return; }
  echo "$PWD/.venv-$v"
}
