# What tools/install_deps.sh, tools/gpu_kit.sh and tools/mmdeploy_check.sh share (sourced, not
# run): the --plan switch, the one way to call pip (always with the project's constraints) and
# the log line. The caller sets PLAN (0 or 1), PY, CONSTRAINTS and SAY_TAG first.

# A log line carrying the seconds since the start, so a slow step shows itself.
say() { printf '[%s %4ds] %s\n' "$SAY_TAG" "$SECONDS" "$*"; }

# Whether Python code runs without error in the target environment.
have() { "$PY" -c "$1" >/dev/null 2>&1; }

# Run a command, or under --plan only print it.
run() {
  if ((PLAN)); then printf '[plan] %s\n' "$*"; else "$@"; fi
}

# SUBCOMMAND (install, download, wheel) then its arguments, always with the constraints. pip
# warns once per missing folder of a local find-links index; those lines are noise.
run_pip() {
  local sub=$1
  shift
  run "$PY" -m pip --disable-pip-version-check "$sub" -c "$CONSTRAINTS" "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
